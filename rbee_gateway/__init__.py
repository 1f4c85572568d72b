"""`rbee serve`: one OpenAI-compatible endpoint for every node the operator has registered.

The gateway runs on the operator's machine and reaches each node's agent the way the rest
of rbee does (the local agent, SSH port forwards, or direct HTTP). It answers OpenAI's
routes itself only for what spans nodes (the merged model list, routing, failover); a
request is relayed, bytes as they come, to one agent's own OpenAI routes.

It never imports textual; `routing` imports no web server, so the dashboard can use it.
"""
