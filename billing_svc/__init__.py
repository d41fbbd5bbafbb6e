"""billing_svc: metered usage: lifecycle events into a usage ledger, reported to Stripe."""
