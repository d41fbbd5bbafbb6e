"""REST transcoding: `google.api.http` routes, path templates, JSON mapping and HTTP errors (pure code)."""
