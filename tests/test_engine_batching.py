"""Continuous batching as clients see it: many streams at once through a real `cake serve` of
the default model (quantized on CPU) each get exactly the greedy text they get alone."""
from __future__ import annotations

import concurrent.futures as cf

import openai
import pytest

QUESTIONS = ["What is the capital of France?", "Name three colours.",
             "Write a haiku about rain.", "What is 12 times 12?", "Say hello in Spanish.",
             "Why do cats purr?"]


@pytest.fixture(scope="module")
def client(default_server):  # serves with --max-batch 4: six clients overflow into the queue
    return openai.OpenAI(base_url=default_server.url + "/v1", api_key="unused", max_retries=0)


def ask(client, question: str, stream: bool) -> str:
    messages = [{"role": "user", "content": question}]
    if not stream:
        r = client.chat.completions.create(model="m", messages=messages, temperature=0,
                                           max_tokens=40)
        return r.choices[0].message.content
    chunks = client.chat.completions.create(model="m", messages=messages, temperature=0,
                                            max_tokens=40, stream=True)
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def test_concurrent_greedy_streams_equal_each_request_alone(client):
    alone = [ask(client, q, stream=False) for q in QUESTIONS]
    assert "Paris" in alone[0]
    assert len(set(alone)) == len(QUESTIONS)  # different questions, different answers
    with cf.ThreadPoolExecutor(len(QUESTIONS)) as pool:  # streams join and leave the batch
        together = list(pool.map(lambda iq: ask(client, iq[1], stream=iq[0] % 2 == 0),
                                 enumerate(QUESTIONS)))
    assert together == alone
