"""`python app.py --mcp` through the real `mcp` client (streamable HTTP, Gradio's /gradio_api/mcp/).

One app process for the module, serving the embedded SmolLM2 on CPU: the tools are exactly the
client endpoints, with their docstrings as descriptions; `steer` answers (zero coefficient: the
steered reply is the baseline's), so does `chat`, and a bad argument comes back as a tool error
naming the field.
Gradio hands a tool's dict back as one text block holding its Python repr.
"""

from __future__ import annotations

import ast
import asyncio
import importlib.util

import pytest
from _server import TOKENS, AppProcess, app_env

from steering import catalog
from steering.ui import endpoints as ui_endpoints

pytestmark = pytest.mark.skipif(importlib.util.find_spec("mcp") is None, reason="needs gradio[mcp] (requirements.txt)")

PROMPT = "Tell me about your weekend."
LAYER = 15  # the embedded model's middle layer


@pytest.fixture(scope="module")
def mcp_app(embedded_dir, tmp_path_factory):
    app = AppProcess(["--mcp"], env=app_env(tmp_path_factory.mktemp("mcp-app")))
    try:
        app.wait_serving()
        yield app
    finally:
        app.kill()


def _session(url: str, work):
    """Run `await work(session)` in an initialised MCP client session on the app's MCP URL."""
    from mcp import ClientSession
    from mcp.client.streamable_http import streamable_http_client

    async def main():
        async with streamable_http_client(url + "gradio_api/mcp/") as (read, write, _):
            async with ClientSession(read, write) as session:
                await session.initialize()
                return await work(session)

    return asyncio.run(main())


def _value(result) -> dict:
    """The tool's answer (a dict written as its Python repr in one text block)."""
    assert not result.isError, result.content
    (block,) = result.content
    return ast.literal_eval(block.text)


def test_mcp_lists_the_endpoints_as_tools_and_steers(mcp_app):
    async def work(session):
        tools = (await session.list_tools()).tools
        steered = await session.call_tool(
            "steer",
            {"prompt": PROMPT, "vectors": [{"text": "dogs", "coeff": 0.0, "layer": LAYER}], "max_new_tokens": TOKENS},
        )
        refused = await session.call_tool("steer", {"prompt": " ", "vectors": []})
        chatted = await session.call_tool(
            "chat",
            {"message": PROMPT, "history_steered": [], "history_baseline": [], "vectors": [], "max_new_tokens": TOKENS},
        )
        return tools, steered, refused, chatted

    tools, steered, refused, chatted = _session(mcp_app.url, work)
    by_name = {tool.name: tool for tool in tools}
    assert set(by_name) == {name for _, name, _ in ui_endpoints.ENDPOINTS}  # UI-only handlers are not tools
    steer = by_name["steer"]
    assert "steering vectors" in steer.description  # the docstring
    properties = steer.inputSchema["properties"]
    assert list(properties)[:2] == ["prompt", "vectors"] and properties["vectors"]["type"] == "array"
    assert properties["max_new_tokens"]["description"] == "tokens to generate, 1 to 512."

    result = _value(steered)
    assert result["model"] == catalog.EMBEDDED_ID and result["layers"] == [LAYER]
    assert result["steered"] and result["steered"] == result["baseline"]  # coefficient 0: unsteered
    assert refused.isError and refused.content[0].text.startswith("prompt: must be a non-empty text")
    chat = _value(chatted)  # the chat tool: both conversations, one turn
    assert chat["history_steered"] == [
        {"role": "user", "content": PROMPT},
        {"role": "assistant", "content": result["baseline"]},  # no vectors: the unsteered reply
    ]
    assert chat["history_baseline"] == chat["history_steered"]
    assert "Traceback" not in mcp_app.log


def test_mcp_with_auth_is_warned_about():
    import app

    args = app.parse_args(["--mcp", "--auth", "alice:s3cret"])
    (warning,) = app.startup_warnings(args, mcp_installed=True)
    assert warning.startswith("--mcp with --auth:") and "127.0.0.1" in warning
    assert app.startup_warnings(app.parse_args(["--mcp"]), mcp_installed=True) == []
