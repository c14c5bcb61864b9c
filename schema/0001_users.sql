-- Users who can log in to upstream-demo (POST /api/v1/auth/login). Passwords are Argon2id PHC
-- strings, never plain text. `tier` and `roles` go into the JWT the gateway verifies.
CREATE TABLE IF NOT EXISTS users (
    id            UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    email         TEXT NOT NULL UNIQUE CHECK (length(email) <= 254),
    password_hash TEXT NOT NULL,
    tier          TEXT NOT NULL DEFAULT 'free'
                  CHECK (tier IN ('anonymous', 'free', 'pro', 'enterprise')),
    roles         TEXT[] NOT NULL DEFAULT '{}',
    created_at    TIMESTAMPTZ NOT NULL DEFAULT now()
);
