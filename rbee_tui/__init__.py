"""rbee's operator side: node registry, SSH, the inference flow, the CLI and the dashboard."""
