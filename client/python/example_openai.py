"""The OpenAI Python SDK talking to tileflowd over its Unix socket.

    pip install openai httpx
    TILEFLOW_SOCKET=/run/tileflowd.sock python3 example_openai.py olmoe

The SDK takes an httpx client through `http_client=`; httpx's UDS transport carries the
requests to the socket, and the base URL's host is only a name.
"""

import os
import sys

import httpx
import openai

SOCK = os.environ.get("TILEFLOW_SOCKET", "/run/tileflowd.sock")
MODEL = sys.argv[1] if len(sys.argv) > 1 else "tiny"

client = openai.OpenAI(
    base_url="http://tileflowd/v1",
    api_key="unused",  # the socket's permissions are the authentication
    http_client=httpx.Client(transport=httpx.HTTPTransport(uds=SOCK)),
)

print("models:", [m.id for m in client.models.list().data])

stream = client.chat.completions.create(
    model=MODEL,
    messages=[{"role": "user", "content": "Say hello to the tile cache."}],
    max_tokens=16,
    temperature=0,
    stream=True,
)
print("chat: ", end="")
for chunk in stream:
    if chunk.choices and chunk.choices[0].delta.content:
        print(chunk.choices[0].delta.content, end="", flush=True)
print()

completion = client.completions.create(model=MODEL, prompt="The experts", max_tokens=8, temperature=0)
print("completion:", repr(completion.choices[0].text), completion.usage)
