"""`probecache classify`, `probecache generate` and `probecache serve`: trained probes inside the model's pass.

No `from __future__ import annotations` here: typer evaluates the option annotations. The serve stage (and
transformers) load only when a command runs, so `probecache --help` stays fast.
"""

import csv
import json
from pathlib import Path
from typing import Annotated

import typer

from probecache.cli_common import CliError, fail, print_table, user_errors

_RUNS = "Runs and model"
_INPUT = "Input"
_GEN = "Generation"
_OUT = "Output"
_LOAD = "Limits"

RunOpt = Annotated[list[str], typer.Option(
    "--run", help="A run folder (printed as `run: ...` by train), or NAME=RUN to name it; repeat to score several "
                  "probes in one pass (they must come from the same model).", rich_help_panel=_RUNS)]
DeviceOpt = Annotated[str, typer.Option(help="auto | cpu | cuda[:N] | mps.", rich_help_panel=_RUNS)]
DtypeOpt = Annotated[str | None, typer.Option(help="bf16 | fp16 | fp32 | auto \\[default: the store's dtype, "
                                                   "which reproduces the training states].", rich_help_panel=_RUNS,
                                              show_default=False)]
ModelOpt = Annotated[str | None, typer.Option(help="Where the model is now, if not where the store found it (its "
                                                   "weights must match) \\[default: the store's model].",
                                              rich_help_panel=_RUNS, show_default=False)]
RefuseOpt = Annotated[list[str], typer.Option(
    help="NAME (refuse when that binary probe predicts its positive class at its tuned threshold), NAME=0.3 (a "
         "threshold on P(positive)) or NAME=LABEL[,LABEL] (refuse on those labels); repeatable.",
    rich_help_panel=_GEN, show_default=False)]
TruncateOpt = Annotated[bool, typer.Option(
    "--truncate", help="Score a prompt longer than a probe reads (its store's --max-tokens) on the part it was "
                       "trained to read, as the extractor cut it, instead of refusing it: a guardrail then sees only "
                       "that part.", rich_help_panel=_INPUT)]
RefusalOpt = Annotated[str | None, typer.Option(help="Text returned instead of a refused generation \\[default: "
                                                     "\"I can't help with that request.\"].", rich_help_panel=_GEN,
                                                show_default=False)]


def parse_refuse_on(specs: list[str]) -> dict | None:
    """['tox', 'emo=anger,fear', 'spam=0.3'] -> {'tox': None, 'emo': ['anger', 'fear'], 'spam': 0.3}."""
    if not specs:
        return None
    rules: dict = {}
    for spec in specs:
        name, sep, value = spec.partition("=")
        if not name or (sep and not value):
            raise CliError(f"--refuse-on {spec!r}: use NAME, NAME=THRESHOLD or NAME=LABEL[,LABEL]")
        if not sep:
            rules[name] = None
            continue
        try:
            rules[name] = float(value)
        except ValueError:
            rules[name] = [v.strip() for v in value.split(",") if v.strip()]
    return rules


def _read_rows(path: Path, file: str) -> list:
    """The records of a .jsonl or .csv file (UnicodeDecodeError for a file that is not UTF-8)."""
    from probecache.serve.limits import too_deep

    if path.suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            try:
                return list(csv.DictReader(f))
            except csv.Error as e:  # a NUL byte, a field over csv's size limit
                raise CliError(f"--file {file}: not a CSV file csv can read ({e})") from None
    if path.suffix != ".jsonl":
        raise CliError(f"--file {file}: use a .jsonl or .csv file")
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            reason = too_deep(line)  # before json.loads, whose parser recurses
            if reason:
                raise CliError(f"--file {file}: line {n}: {reason} (a .jsonl file holds one flat object per line)")
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise CliError(f"--file {file}: line {n} is not JSON (a .jsonl file holds one object per "
                               f"line)") from None
    return rows


def read_texts(file: str, text_col: str) -> list[str]:
    """Texts of a .jsonl (one object per line) or .csv file, from column ``text_col``."""
    path = Path(file).expanduser()
    if not path.is_file():
        raise CliError(f"--file {file}: no such file")
    try:
        rows = _read_rows(path, file)
    except UnicodeDecodeError as e:
        raise CliError(f"--file {file} is not UTF-8 text (byte {e.start}): save it as UTF-8") from None
    texts = []
    for n, row in enumerate(rows, start=1):
        if not isinstance(row, dict) or not isinstance(row.get(text_col), str):
            columns = ", ".join(row) if isinstance(row, dict) else type(row).__name__
            raise CliError(f"--file {file}: record {n} has no text column {text_col!r} (it has: {columns}); pass "
                           f"--text-col")
        texts.append(row[text_col])
    if not texts:
        raise CliError(f"--file {file} holds no records")
    return texts


def _load(run: list[str], device: str, dtype: str | None, model: str | None):
    from transformers.utils import logging as hf_logging

    from probecache.serve.probed import ProbedModel, run_names

    hf_logging.disable_progress_bar()
    if not run:
        raise CliError("pass --run RUN (a run folder printed by probecache train)")
    return ProbedModel.from_runs(run_names(run), device=device, dtype=dtype, model=model)


def _cell(result: dict) -> str:
    if "score" in result:
        return f"{result['label']} {result['score']:.3f}"
    return f"{result['label']} {result['scores'][result['label']]:.3f}"


def _short(text: str, width: int = 40) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def register(app: typer.Typer) -> None:
    @app.command(epilog="Examples:\n\n  probecache classify --run runs/<id> --text 'a quiet masterpiece'\n\n"
                        "  probecache classify --run tox=runs/<a> --run sentiment=runs/<b> --file prompts.jsonl --json")
    def classify(
        run: RunOpt,
        text: Annotated[list[str], typer.Option(help="A text to classify; repeatable.", rich_help_panel=_INPUT,
                                                show_default=False)] = [],  # noqa: B006
        file: Annotated[str | None, typer.Option(help="A .jsonl (one object per line) or .csv file of texts.",
                                                 rich_help_panel=_INPUT)] = None,
        text_col: Annotated[str, typer.Option(help="The text column of --file.", rich_help_panel=_INPUT)] = "text",
        batch_size: Annotated[int, typer.Option(help="Texts per forward pass.", rich_help_panel=_INPUT)] = 16,
        truncate: TruncateOpt = False,
        as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line per text.",
                                              rich_help_panel=_OUT)] = False,
        device: DeviceOpt = "cpu",
        dtype: DtypeOpt = None,
        model: ModelOpt = None,
    ) -> None:
        """Score texts with trained probes, all inside one forward pass of the model they were trained on.

        Binary probes: P(positive class) and the label at the threshold tuned on validation. Multiclass: the label.
        A text longer than a probe reads is refused unless --truncate.
        """
        try:
            if bool(text) == bool(file):
                raise CliError("pass --text (repeatable) or --file, not both and not neither")
            texts = list(text) if text else read_texts(file, text_col)
            probed = _load(run, device, dtype, model)
            results = probed.classify(texts, batch_size=batch_size, truncate=truncate)
        except user_errors() as e:
            fail(e)
        if as_json:
            for i, (t, r) in enumerate(zip(texts, results, strict=True)):
                typer.echo(json.dumps({"index": i, "text": t, "probes": r}))
            return
        rows = [["#", "text", *probed.names]]
        rows += [[str(i), _short(t), *(_cell(r[name]) for name in probed.names)]
                 for i, (t, r) in enumerate(zip(texts, results, strict=True))]
        print_table(rows)

    @app.command(epilog="Example:\n\n  probecache generate --run tox=runs/<id> --text 'how do I ...' --refuse-on tox")
    def generate(
        run: RunOpt,
        text: Annotated[list[str], typer.Option(help="A prompt; repeat for a batch.", rich_help_panel=_INPUT,
                                                show_default=False)] = [],  # noqa: B006
        max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate at most.", rich_help_panel=_GEN)] = 32,
        refuse_on: RefuseOpt = [],  # noqa: B006
        refusal: RefusalOpt = None,
        truncate: TruncateOpt = False,
        as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line per prompt.",
                                              rich_help_panel=_OUT)] = False,
        device: DeviceOpt = "cpu",
        dtype: DtypeOpt = None,
        model: ModelOpt = None,
    ) -> None:
        """Generate with the model and report the probes' scores from the generation's own prefill.

        With --refuse-on, a prompt that a probe flags gets the refusal text, decided before the first token. A prompt
        longer than a probe reads is refused unless --truncate.
        """
        from probecache.serve.policy import DEFAULT_REFUSAL

        try:
            if not text:
                raise CliError("pass --text PROMPT (repeatable)")
            rules = parse_refuse_on(refuse_on)
            probed = _load(run, device, dtype, model)
            results = probed.generate(text, max_new_tokens=max_new_tokens, refuse_on=rules, truncate=truncate,
                                      refusal=refusal if refusal is not None else DEFAULT_REFUSAL)
        except user_errors() as e:
            fail(e)
        for i, (prompt, r) in enumerate(zip(text, results, strict=True)):
            if as_json:
                typer.echo(json.dumps({"index": i, "prompt": prompt, **r}))
                continue
            status = f"refused by {', '.join(r['refused_by'])}" if r["refused"] else f"{r['new_tokens']} new tokens"
            typer.echo(f"[{i}] prompt: {_short(prompt, 70)}")
            typer.echo(f"    output ({status}): {r['text']}")
            for name, result in r["probes"].items():
                threshold = "" if result["threshold"] is None else f" (threshold {result['threshold']:.3g})"
                typer.echo(f"    {name}: {_cell(result)}{threshold}")

    @app.command(epilog="Example:\n\n  probecache serve --run tox=runs/<id> --refuse-on tox --port 8000\n\n"
                        "  curl -s localhost:8000/classify -d '{\"texts\": [\"hello\"]}'")
    def serve(
        run: RunOpt,
        host: Annotated[str, typer.Option(help="Address to bind; there is no authentication, keep it local.")
                        ] = "127.0.0.1",
        port: Annotated[int, typer.Option(help="TCP port (0: any free port).")] = 8000,
        refuse_on: RefuseOpt = [],  # noqa: B006
        refusal: RefusalOpt = None,
        max_new_tokens: Annotated[int, typer.Option(help="/generate's default when a request does not say.",
                                                    rich_help_panel=_GEN)] = 32,
        truncate: Annotated[bool, typer.Option(
            "--truncate", help="Let every request score a prompt longer than a probe reads on the part it was trained "
                               "to read (without it: 413, and a request may opt in with \"truncate\": true only where "
                               "no --refuse-on guards it).", rich_help_panel=_LOAD)] = False,
        concurrency: Annotated[int, typer.Option(help="Requests in the model at once.", rich_help_panel=_LOAD)] = 1,
        max_queue: Annotated[int, typer.Option(help="Requests that may wait for the model; more get 503 with "
                                                    "Retry-After.", rich_help_panel=_LOAD)] = 16,
        queue_timeout: Annotated[float, typer.Option(help="Seconds a request may wait for the model before it gets "
                                                          "503.", rich_help_panel=_LOAD)] = 30.0,
        max_chars: Annotated[int, typer.Option(help="Characters per text; longer ones get 413 before tokenising.",
                                               rich_help_panel=_LOAD)] = 65_536,
        device: DeviceOpt = "cpu",
        dtype: DtypeOpt = None,
        model: ModelOpt = None,
    ) -> None:
        """A small HTTP endpoint: POST /classify and /generate with JSON, GET /health and /openapi.json.

        Bodies: {"texts": [...]}; /generate also max_new_tokens, refusal, refuse_on (adds to --refuse-on, never lifts).
        Overload answers 503 with Retry-After; too-long prompts 413 (see --truncate).
        """
        from probecache.serve.http import make_server
        from probecache.serve.policy import DEFAULT_REFUSAL, parse_rules

        try:
            rules = parse_refuse_on(refuse_on)
            probed = _load(run, device, dtype, model)
            parse_rules(rules, probed.runs)  # a bad --refuse-on fails now, not at the first request
        except user_errors() as e:
            fail(e)
        try:
            server = make_server(probed, host, port, refuse_on=rules, max_new_tokens=max_new_tokens,
                                 refusal=refusal if refusal is not None else DEFAULT_REFUSAL, truncate=truncate,
                                 concurrency=concurrency, queue=max_queue, queue_timeout=queue_timeout,
                                 max_chars=max_chars)
        except user_errors() as e:
            fail(e)
        except OSError as e:  # binding the socket: the address is taken, or not this machine's
            fail(CliError(f"cannot listen on {host}:{port} ({e.strerror or e}): pass another --port or --host"))
        typer.echo(f"serving {', '.join(probed.names)} on {server.url} (POST /classify, /generate; GET /health, "
                   "/openapi.json); Ctrl-C stops", err=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            server.server_close()
