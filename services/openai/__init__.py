"""The OpenAI-compatible surface (issue 12): wire schemas, the translation of OpenAI requests into ordinary
jobs, response shapes, the OpenAI error shape, and the Batch API's file and batch storage.

Routes live in `services/api/routes_openai.py` (completions, chat, models), `routes_fim.py`,
`routes_files.py` and `routes_batches.py`; docs/api.md has the OpenAI section.
"""
