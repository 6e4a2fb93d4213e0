-- Ready messages are found through messages_ready; keeping them in
-- messages_by_state as well cost a B-tree insert per enqueue and a delete
-- and an insert per claim (the key holds the state). Without them a
-- 100,000-job claim-and-ack drain spends about a quarter less time in
-- SQLite. Queries over scheduled, leased or dead messages state the
-- index's condition (`state <> 2`) so SQLite can use it.
DROP INDEX messages_by_state;
CREATE INDEX messages_by_state ON messages (queue, state, id) WHERE state <> 2;
