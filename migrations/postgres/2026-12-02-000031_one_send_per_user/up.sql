-- At most one message per (app, openid) is leased at any moment, on any number of
-- instances: WeChat answers 43108 to concurrent sends to one user, and a user gets
-- their messages one after the other. The sender skips users with a leased message;
-- this index is the guarantee when two instances race for one user.
CREATE UNIQUE INDEX messages_one_leased_per_user ON messages (app_id, openid)
    WHERE lease_owner IS NOT NULL;
