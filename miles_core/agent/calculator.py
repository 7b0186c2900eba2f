"""The shipped example tool: a calculator for arithmetic expressions (multi-step arithmetic).

It evaluates `+ - * / // % **` and parentheses over integers and decimals by walking Python's
AST; names, calls, attributes and anything else are refused, so a model cannot run code through
it. Exponents and results are bounded so a call cannot take the machine's memory or time.
"""

from __future__ import annotations

import ast
import operator

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
MAX_ABS = 10**18
"""Largest magnitude of any intermediate result."""


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression such as '12 + 34 * 2' and return the result."""
    if len(expression) > 200:
        raise ValueError("expression is longer than 200 characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError:
        raise ValueError(f"not an arithmetic expression: {expression!r}") from None
    return _format(_eval(tree.body))


def _eval(node: ast.AST) -> int | float:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_eval(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > 64:
            raise ValueError("exponent larger than 64")
        value = _BINARY[type(node.op)](left, right)  # ZeroDivisionError is the tool's error message
        if abs(value) > MAX_ABS:
            raise ValueError("result too large")
        return value
    raise ValueError(f"unsupported expression element: {type(node).__name__}")


def _format(value: int | float) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(round(value, 10)) if isinstance(value, float) else str(value)
