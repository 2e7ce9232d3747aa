-- What a rebuild is doing now (loading, replaying, swapping, handing over), for the API.
ALTER TABLE projection_versions ADD COLUMN IF NOT EXISTS phase text;
