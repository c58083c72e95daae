"""ComfyBatch's engine: config, ComfyUI client, SQLite store, workflows, scheduler, CSV intake, CLI."""
