"""The worker process: one GGUF model, one HTTP server, llama.cpp on its own threads."""
