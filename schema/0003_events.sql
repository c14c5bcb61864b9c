-- Events accepted by POST /api/v1/events, written here in batches by the Redis Stream worker.
-- The unique idempotency key is the last line of defence: a retried or replayed event never
-- creates a second row (the worker inserts with ON CONFLICT DO NOTHING).
CREATE TABLE IF NOT EXISTS events (
    id              UUID PRIMARY KEY,
    idempotency_key TEXT NOT NULL CHECK (length(idempotency_key) BETWEEN 1 AND 200),
    payload         JSONB NOT NULL,
    consumer_id     TEXT,
    accepted_at     TIMESTAMPTZ NOT NULL,
    stored_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
    CONSTRAINT events_idempotency_key_key UNIQUE (idempotency_key)
);
