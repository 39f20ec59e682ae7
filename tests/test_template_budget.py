"""The chat-template work budget (template_budget.py): hostile templates end, real ones render.

Every hostile template here ran for hours or took gigabytes before the budget. Each
must now end with `template_error`, within its time budget (plus generous slack for a
loaded machine), and without allocating anywhere near what it asked for.
"""

from __future__ import annotations

import threading
import time
import tracemalloc
from pathlib import Path

import pytest
from conftest import CHAT_TEMPLATES

from ffai_worker.text.chat_template import ChatTemplateError, render
from ffai_worker.text.template_budget import MAX_CALL_DEPTH, RenderBudget

BUDGET = RenderBudget(time_s=0.5)
SLACK_S = 3.0  # a shared, loaded CI machine; the point is "ends", not "ends fast"
USER = [{"role": "user", "content": "Hi"}]

# Templates that run (nearly) forever unless the deadline stops them.
ENDLESS = {
    "nested_loops": "{% for i in range(99999) %}{% for j in range(99999) %}x{% endfor %}"
    "{% endfor %}",
    "nested_empty_loops": "{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}"
    "{% endfor %}",
    "forking_macro": "{% macro f(n) %}{% if n < 60 %}{{ f(n + 1) }}{{ f(n + 1) }}{% endif %}"
    "{% endmacro %}{{ f(0) }}",
    "loop_over_a_list": "{% set l = range(99999)|list %}{% for i in l %}{% for j in l %}"
    "{% endfor %}{% endfor %}",
}
# Templates whose single operation would take gigabytes or hours: refused before it runs.
HUGE = {
    "power": "{{ 9**(9**9) }}",
    "repeat": "{{ 'a' * 10**9 }}",
    "repeat_list": "{{ [1] * 10**9 }}",
    "lipsum": "{{ lipsum(n=1000000) }}",
    "string_doubling": "{% set s = namespace(v='a') %}{% for i in range(64) %}"
    "{% set s.v = s.v ~ s.v %}{% endfor %}{{ s.v }}",
    "plus_doubling": "{% set s = namespace(v='a') %}{% for i in range(64) %}"
    "{% set s.v = s.v + s.v %}{% endfor %}{{ s.v }}",
    "int_squaring": "{% set s = namespace(v=3) %}{% for i in range(64) %}"
    "{% set s.v = s.v * s.v %}{% endfor %}{{ s.v % 10 }}",
    "replace_doubling": "{% set s = namespace(v='ab') %}{% for i in range(64) %}"
    "{% set s.v = s.v.replace('a', 'aa') %}{% endfor %}{{ s.v|length }}",
    "ljust": "{{ 'a'.ljust(10**9) }}",
    "center_filter": "{{ 'a'|center(10**9) }}",
    "format_width": "{{ '{:>999999999}'.format(1) }}",
    "percent_width": "{{ '%999999999d' % 1 }}",
    "format_filter": "{{ '%*d'|format(999999999, 1) }}",
    "set_block": "{% set big = 'a' * 1000000 %}{% set s %}{% for i in range(99999) %}{{ big }}"
    "{% endfor %}{% endset %}{{ s|length }}",
    "nested_list_str": "{% set l = ['a' * 100000] %}{{ [l * 10] * 100000 }}",
    "join": "{% set l = ['a' * 1000000] %}{{ (l * 1)|join('x') * 10 }}",
    "batch": "{{ [1]|batch(10**9, 'x')|list|length }}",
    "tojson_indent": "{{ messages|tojson(indent=10**6) }}",
    "deep_recursion": "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
}


def refused(source: str, budget: RenderBudget = BUDGET) -> tuple[ChatTemplateError, float, int]:
    """Render and expect template_error; return the error, seconds taken, peak bytes."""
    tracemalloc.start()
    start = time.monotonic()
    try:
        with pytest.raises(ChatTemplateError) as error:
            render(source, USER, budget)
        elapsed = time.monotonic() - start
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert error.value.code == "template_error"
    return error.value, elapsed, peak


@pytest.mark.parametrize("name", sorted(ENDLESS))
def test_endless_template_ends_at_its_deadline(name: str) -> None:
    error, elapsed, _ = refused(ENDLESS[name])
    assert "budget" in error.message
    assert elapsed < BUDGET.time_s + SLACK_S


@pytest.mark.parametrize("name", sorted(HUGE))
def test_huge_operation_is_refused_before_it_runs(name: str) -> None:
    error, elapsed, peak = refused(HUGE[name])
    assert elapsed < BUDGET.time_s + SLACK_S
    # The size limit is ~1 MiB of chars (+ inputs); a few copies of that at most.
    assert peak < 64 << 20, (name, peak, error.message)


def test_messages_are_reported_plainly() -> None:
    assert "budget" in refused(HUGE["repeat"])[0].message
    assert f"deeper than {MAX_CALL_DEPTH}" in refused(HUGE["deep_recursion"])[0].message
    assert "1 s budget" in refused(ENDLESS["nested_loops"], RenderBudget(time_s=1.0))[0].message


def test_modest_use_of_the_same_features_renders() -> None:
    source = (
        "{% macro f(n) %}{% if n > 0 %}{{ f(n - 1) }}{% endif %}{{ n }}{% endmacro %}{{ f(20) }}|"
        "{{ 2**64 }}|{{ 'ab' * 3 }}|{{ 'x'.ljust(4, '.') }}|{{ '%3d' % 7 }}|{{ 'a' ~ 'b' }}|"
        "{{ lipsum(1, False, 3, 4).split()|length }}|{{ [1, 2, 3]|batch(2)|list }}|"
        "{{ {'k': [1]}|tojson(indent=2) }}"
    )
    expected = (
        "01234567891011121314151617181920|18446744073709551616|ababab|x...|  7|ab|3|"
        '[[1, 2], [3]]|{\n  "k": [\n    1\n  ]\n}'
    )
    assert render(source, USER, BUDGET) == expected


def test_size_limit_grows_with_the_conversation() -> None:
    """A real template copying a 3 MB conversation (over the 1 MiB base) still renders."""
    source = (CHAT_TEMPLATES / "llama-3.1-instruct.jinja").read_text()
    big = [{"role": "user", "content": "word " * 600_000}]
    text = render(source, big, BUDGET, bos_token="<|begin_of_text|>", date_string="1 Jan 2025")
    assert text.count("word") == 600_000


def test_each_render_has_its_own_budget_per_thread() -> None:
    """A hostile render on one thread does not spend another thread's budget."""
    source = Path(CHAT_TEMPLATES / "qwen2.5-instruct.jinja").read_text()
    hostile: list[BaseException] = []

    def run_hostile() -> None:
        try:
            render(ENDLESS["nested_empty_loops"], USER, RenderBudget(time_s=1.5))
        except ChatTemplateError as exc:
            hostile.append(exc)

    thread = threading.Thread(target=run_hostile)
    thread.start()
    try:
        rendered = [render(source, USER, RenderBudget(time_s=0.5)) for _ in range(20)]
    finally:
        thread.join()
    assert all(r == rendered[0] for r in rendered) and "Hi" in rendered[0]
    assert len(hostile) == 1 and "1.5 s budget" in str(hostile[0])
