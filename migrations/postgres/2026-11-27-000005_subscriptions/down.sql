DROP TABLE subscription_templates;
DROP TABLE subscription_results;
