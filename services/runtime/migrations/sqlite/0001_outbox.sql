-- The transactional outbox: a service inserts its event here in the same
-- transaction as its state change; the relay publishes rows in `seq` order and
-- deletes them once the bus has acknowledged them.
CREATE TABLE plinth_outbox (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id   TEXT    NOT NULL UNIQUE,
    subject    TEXT    NOT NULL,
    aggregate  TEXT    NOT NULL,
    payload    BLOB    NOT NULL,
    headers    TEXT    NOT NULL,
    created_at INTEGER NOT NULL
);
