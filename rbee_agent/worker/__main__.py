"""`python -m rbee_agent.worker`: serve one GGUF model over HTTP (B40)."""

from rbee_agent.worker.main import main

raise SystemExit(main())
