DROP TABLE service_secrets;
DROP TABLE access_tokens;
