ALTER TABLE messages DROP COLUMN wakes;
