"""Drives a running crayond with the official OpenAI Python client (tests/hybrid.rs); prints one
JSON object of what it saw. Usage: openai_client.py BASE_URL (e.g. http://127.0.0.1:8090/v1)."""

import json
import sys

import openai

client = openai.OpenAI(base_url=sys.argv[1], api_key="unused", max_retries=0, timeout=60)
out = {}

chat = client.chat.completions.create(
    model="default", messages=[{"role": "user", "content": "Say hi"}], max_tokens=5, temperature=0,
    logprobs=True, top_logprobs=2)
out["chat_text"] = chat.choices[0].message.content
out["chat_finish"] = chat.choices[0].finish_reason
out["chat_usage"] = chat.usage.completion_tokens
out["chat_logprobs"] = [[t.token, t.logprob, [a.token for a in t.top_logprobs]] for t in chat.choices[0].logprobs.content]

stream = client.chat.completions.create(
    model="default", messages=[{"role": "user", "content": "Say hi"}], max_tokens=5, temperature=0, stream=True,
    logprobs=True, top_logprobs=2)
chunks = [c for c in stream if c.choices]
out["stream_text"] = "".join(c.choices[0].delta.content or "" for c in chunks)
out["stream_logprobs"] = [[t.token, t.logprob, [a.token for a in t.top_logprobs]]
                          for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.content]

done = client.completions.create(model="default", prompt="The sky is", max_tokens=4, temperature=0, logprobs=2)
out["completion_text"] = done.choices[0].text
out["completion_tokens"] = done.choices[0].logprobs.tokens

pieces = client.completions.create(model="default", prompt="The sky is", max_tokens=4, temperature=0, stream=True)
out["completion_stream_text"] = "".join(c.choices[0].text for c in pieces if c.choices)

several = client.chat.completions.create(
    model="default", messages=[{"role": "user", "content": "Say hi"}], max_tokens=4, temperature=1.0, seed=3, n=2)
out["n"] = [c.index for c in several.choices]
out["n_texts"] = [c.message.content for c in several.choices]
streamed = client.chat.completions.create(
    model="default", messages=[{"role": "user", "content": "Say hi"}], max_tokens=4, temperature=1.0, seed=3, n=2,
    stream=True)
texts = {}
for c in streamed:
    for choice in c.choices:
        texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
out["n_stream_texts"] = [texts.get(i) for i in range(2)]

out["models"] = [m.id for m in client.models.list()]
out["retrieved"] = client.models.retrieve(out["models"][0]).id
try:
    client.models.retrieve("no-such-model")
    out["missing_model"] = "found"
except openai.NotFoundError as e:
    out["missing_model"] = e.status_code

for name, kwargs in [("tools", {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}),
                     ("response_format", {"response_format": {"type": "json_object"}})]:
    try:
        client.chat.completions.create(model="default", messages=[{"role": "user", "content": "x"}], max_tokens=2, **kwargs)
        out[name] = "accepted"
    except openai.BadRequestError as e:
        out[name] = e.message
print(json.dumps(out))
