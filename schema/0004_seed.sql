-- Demo seed data, safe to apply more than once (ON CONFLICT DO NOTHING).
--   admin@example.com / admin123  roles [admin], tier enterprise
--   user@example.com  / user123   roles [user],  tier free
-- The hashes are Argon2id PHC strings (m=19456 KiB, t=2, p=1: the argon2 crate's defaults).
-- upstream-demo's unit test `seed_hashes_match_demo_passwords` checks them against the passwords.
INSERT INTO users (id, email, password_hash, tier, roles) VALUES
    ('00000000-0000-4000-8000-00000000a001', 'admin@example.com',
     '$argon2id$v=19$m=19456,t=2,p=1$f+QSon67JeEVCSBcdZkZng$Dhryni5nZmYZLsMd1GFirf2fPWhRdL5Y1PIoqcOzSrY',
     'enterprise', ARRAY['admin']),
    ('00000000-0000-4000-8000-00000000a002', 'user@example.com',
     '$argon2id$v=19$m=19456,t=2,p=1$fmXbr6EWBO1cFqlYJ9c9AQ$A+AN9ALGnmkSjXx1xml34WkSX/CxAkFThgAfrRQuJN8',
     'free', ARRAY['user'])
ON CONFLICT DO NOTHING;

INSERT INTO resources (id, name, description, owner) VALUES
    (1, 'Getting started', 'What the Tollgate demo shows and how to call it', NULL),
    (2, 'Rate limits', 'Tiers: anonymous, free, pro, enterprise', NULL),
    (3, 'Circuit breaker', 'GET /api/v1/external fails or stalls on purpose', NULL),
    (4, 'Caching', 'Cacheable GETs under /api/v1/resources', NULL),
    (5, 'Idempotent events', 'POST /api/v1/events with an Idempotency-Key', NULL)
ON CONFLICT DO NOTHING;

-- The explicit ids above did not advance the identity sequence: move it past them.
SELECT setval(pg_get_serial_sequence('resources', 'id'), GREATEST((SELECT max(id) FROM resources), 1));
