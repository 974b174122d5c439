DROP TABLE wechat_templates;
