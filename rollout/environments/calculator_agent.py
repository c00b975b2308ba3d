"""An agent written against the OpenAI API, as a team would bring it: the model is given a `calc` function
tool, each call it makes is answered with the calculator's value, and its last message is the answer
(`configs/tiny-agent.yaml`). The agent returns no reward of its own: `reward.rules` score the answer.

The expression is read by `contracts.arith_parser` (through `calculator.calculate`): nothing the model
writes is run as code.
"""

from __future__ import annotations

import json

from rollout.environments.calculator import calculate

CALC_TOOL = {
    "type": "function",
    "function": {
        "name": "calc",
        "description": "The value of an arithmetic expression (+ - * / and parentheses).",
        "parameters": {"type": "object", "properties": {"x": {"type": "string"}}, "required": ["x"]},
    },
}


async def calculator_agent(client, record, max_calls: int = 2):
    """One episode: the record's question, the `calc` tool, up to `max_calls` calls, then the answer."""
    messages = [m for m in record["messages"] if m["role"] != "system"]  # the tool list is the system line
    for _ in range(max_calls + 1):
        reply = await client.chat.completions.create(model="policy", messages=messages, tools=[CALC_TOOL])
        message = reply.choices[0].message
        if not message.tool_calls:
            return None  # the answer, which the reward rules score
        messages.append(message.model_dump(exclude_none=True))
        for call in message.tool_calls:
            messages.append({"role": "tool", "tool_call_id": call.id, "content": tool_result(call.function.arguments)})
    return None


def tool_result(arguments: str) -> str:
    """The calculator's answer to a call's JSON arguments, or an error the model can read."""
    try:
        expression = json.loads(arguments).get("x")
    except (ValueError, AttributeError):
        return "error: arguments must be a JSON object with x"
    if not isinstance(expression, str):
        return "error: x must be a string"
    return calculate(expression)[0]
