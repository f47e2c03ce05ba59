"""The in-process gateway the request-rule tests share: every rule set on each of the four
OpenAI shapes, a route without rules, and a key allowed one request a minute."""

from __future__ import annotations

from gateway.auth import hash_key

KEY = "sk-gw-rules"
ONE_A_MINUTE = "sk-gw-rules-one-a-minute"
JSON = ("content-type", "application/json")
AUTH = [("authorization", f"Bearer {KEY}"), JSON]
LIMITED = [("authorization", f"Bearer {ONE_A_MINUTE}"), JSON]

# Small limits, so that each can be crossed by a body of a few lines.
FULL_RULES = """\
    max_messages: 4
    min_messages: 1
    roles: [system, user, assistant, tool]
    max_message_chars: 20
    max_total_chars: 50
    max_output_tokens: {min: 1, max: 100}
    temperature: {min: 0, max: 1}
    top_p: {min: 0.1, max: 1}
    max_stop: 2
    max_stop_chars: 5
    max_n: 2
    model_pattern: "gpt-4o(-mini)?|fast"
    max_tools: 1
    max_input_items: 2
    max_input_chars: 30
"""

CONFIG = f"""
server: {{access_log: false}}
upstreams:
  main: {{base_url: "http://upstream.test/v1"}}
  other: {{base_url: "http://other.test/v1"}}
request_rules:
  full:
{FULL_RULES}
  no-system: {{system_messages: false}}
routes:
  - {{name: chat, path: /v1/chat/completions, upstream: main, validate: full}}
  - {{name: completions, path: /v1/completions, upstream: main, validate: full}}
  - {{name: embeddings, path: /v1/embeddings, upstream: main, validate: full}}
  - {{name: responses, path: /v1/responses, upstream: main, validate: full}}
  - name: no-system-chat
    path: /no-system/chat/completions
    upstream: main
    upstream_path: /chat/completions
    validate: no-system
  - name: no-system-responses
    path: /no-system/responses
    upstream: main
    upstream_path: /responses
    validate: no-system
  - name: inline
    path: /inline/chat/completions
    upstream: main
    upstream_path: /chat/completions
    model_in_body: false
    validate: {{max_messages: 1}}
  - name: open
    path: /open/chat/completions
    upstream: main
    upstream_path: /chat/completions
models:
  fast: {{upstream: other, model: small-model-v2}}
allow_unlisted_models: true
keys:
  - {{name: demo, hash: {hash_key(KEY)}}}
  - name: one-a-minute
    hash: {hash_key(ONE_A_MINUTE)}
    limits: {{requests_per_minute: 1}}
"""
