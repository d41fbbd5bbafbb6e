"""instance_svc: instance lifecycle: state machine, timeouts, quotas, snapshots, warm pool, runtimes."""
