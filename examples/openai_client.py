"""Query a running `kvjax serve` with the official openai client.

    kvjax serve --model smollm2 --press snapkv --ratio 0.75 --port 8000 &
    python examples/openai_client.py --base-url http://127.0.0.1:8000/v1 --model smollm2

Asks one question about a document three ways: with the server's press, with another press
chosen per request, and from a compressed context created once; streams one answer; prints
the KV bytes each held and the server's pool gauges.
"""

import argparse

import httpx
from openai import OpenAI

DOCUMENT = ("The harbour master kept a ledger of every ship. On the third page, written in "
            "green ink, was the name of the only vessel that never came back: the Albatross. ")
QUESTION = "Which ship never came back?"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--api-key", default="none")
    ap.add_argument("--max-tokens", type=int, default=24)
    args = ap.parse_args(argv)
    client = OpenAI(base_url=args.base_url, api_key=args.api_key, max_retries=0)
    auth = {"Authorization": f"Bearer {args.api_key}"}
    print("models:", [m.id for m in client.models.list().data])

    messages = [{"role": "user", "content": DOCUMENT + QUESTION}]
    for kvjax in ({}, {"press": "knorm", "compression_ratio": 0.5}):
        r = client.chat.completions.create(model=args.model, messages=messages,
                                           max_tokens=args.max_tokens, temperature=0,
                                           extra_body={"kvjax": kvjax} if kvjax else None)
        info = r.model_extra["kvjax"]
        print(f"{info['press']:>8}: {r.choices[0].message.content!r} "
              f"({info['kv_bytes']} KV bytes, {r.usage.completion_tokens} tokens)")

    print("stream:  ", end="")
    for chunk in client.chat.completions.create(model=args.model, messages=messages,
                                                max_tokens=args.max_tokens, temperature=0,
                                                stream=True):
        if chunk.choices and chunk.choices[0].delta.content:
            print(chunk.choices[0].delta.content, end="", flush=True)
    print()

    ctx = httpx.post(f"{args.base_url}/contexts", headers=auth, timeout=600,
                     json={"text": DOCUMENT}).json()
    print(f"context {ctx['id']}: {ctx['n_tokens']} tokens in {ctx['kv_bytes']} KV bytes")
    for q in (QUESTION, "What colour was the ink?"):
        r = client.chat.completions.create(
            model=args.model, messages=[{"role": "user", "content": q}],
            max_tokens=args.max_tokens, temperature=0,
            extra_body={"kvjax": {"context_id": ctx["id"]}})
        print(f"  {q!r}: {r.choices[0].message.content!r}")
    httpx.delete(f"{args.base_url}/contexts/{ctx['id']}", headers=auth)

    root = args.base_url.rsplit("/v1", 1)[0]
    for line in httpx.get(f"{root}/metrics").text.splitlines():
        if line.startswith(("kvjax_pool_slots", "kvjax_requests_running",
                            "kvjax_output_tokens_total")):
            print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
