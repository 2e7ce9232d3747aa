"""Identity: who calls (a JWT or an API key), in which tenant, allowed to do what, how
often, and the audit trail of what they did. See `edge` (authentication at the edge),
`access` (each route's permission), `permissions` (the roles table), `keys`,
`ratelimit`, `audit` and `local` (the local stack's issuer)."""
