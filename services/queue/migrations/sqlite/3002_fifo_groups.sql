-- FIFO within groups: a queue may hand out one message per group at a
-- time, in enqueue order. The index finds a group's oldest live message
-- (scheduled, ready or leased), which is the only one a claim may take.
ALTER TABLE queues ADD COLUMN fifo_groups BOOLEAN NOT NULL DEFAULT FALSE;
CREATE INDEX messages_group_head ON messages (queue, group_key, id) WHERE group_key <> '' AND state IN (1, 2, 3);
