"""The OpenAI-compatible API of an agent (B180-B185, B193, B194).

`wire` (request models), `translate` (to rbee's InferenceRequest and back), `grammar`
(response_format as GBNF) and `errors` (OpenAI's error shape) import no web framework, so
the gateway uses them too; `routes` is the agent's FastAPI router.
"""
