"""gateway_svc: the single public entry: API keys, rate limits, tenant checks, routing and proxying to agents."""
