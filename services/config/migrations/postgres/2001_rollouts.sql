-- What clients outside a rollout read ('' = the head), and the last rollout
-- of each environment.
ALTER TABLE config_environments ADD COLUMN current_release TEXT COLLATE "C" NOT NULL DEFAULT '';

CREATE TABLE config_rollouts (
    namespace TEXT COLLATE "C" NOT NULL,
    environment TEXT COLLATE "C" NOT NULL,
    release TEXT COLLATE "C" NOT NULL,
    previous_release TEXT COLLATE "C" NOT NULL,
    percentage INTEGER NOT NULL,
    labels TEXT NOT NULL,
    state TEXT NOT NULL,
    updated_by TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (namespace, environment),
    FOREIGN KEY (namespace, environment) REFERENCES config_environments (namespace, name) ON DELETE CASCADE
);
