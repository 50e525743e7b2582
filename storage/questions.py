"""Question files: the one parser behind `premem retrieve` and `premem train-lumen` (no Beam, no torch).

A question file comes in one of two forms, told apart by its content:

- a JSON array of objects (FiD's form: ``[{"id": ..., "question": ..., "answers": [...], "ctxs": [...]}, ...]``)
  when its first non-space character is ``[`` and the whole file is one JSON value;
- otherwise JSONL: one object per line, blank lines skipped (a file that starts with ``[`` but is not one JSON
  value, e.g. JSONL whose first line is a list, is read as JSONL, so its lines are judged one by one).

The suffix (.json / .jsonl) does not matter: FiD's files are .json arrays, but many JSONL files are named .json.

Each record is an object with
- ``question``: a non-empty string (the field name is configurable: ``premem retrieve --question-field``);
- ``id``: a string or an integer (``--id-field``); absent, it is the first 16 hex digits of sha256 of the
  question's UTF-8 text, so retrieval and training give a question without an id the same id;
- ``answers`` (list of non-empty strings) or ``answer`` (one string): required for training only;
- anything else (FiD's ``ctxs``, ``target``, ...) is ignored: premem retrieves its own passages.

A bad record raises / is reported as a :class:`BadQuestion` with a short fixed ``reason`` (what tests and
summaries count) and an optional ``detail``; it is never dropped silently.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field

from premem.storage.errors import InputError
from premem.storage.kv import read_file

ID_HEX_DIGITS = 16


@dataclass
class Question:
    """One question with its reference answers (the first one is the training target)."""

    id: str
    question: str
    answers: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class QuestionFields:
    """Which fields hold the id and the question; the options that rename them, named in the reasons' hints."""

    id: str = "id"
    question: str = "question"
    id_option: str | None = None  # e.g. "--id-field" for `premem retrieve`
    question_option: str | None = None  # e.g. "--question-field"


DEFAULT_FIELDS = QuestionFields()


class BadQuestion(InputError):
    """A record that is not a usable question: ``reason`` is the fixed kind, ``detail`` the particulars."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason} ({detail})" if detail else reason)
        self.reason = reason
        self.detail = detail


def missing_id(question: str) -> str:
    """The id of a question that has none: the first 16 hex digits of sha256 of its UTF-8 text."""
    return hashlib.sha256(question.encode("utf-8")).hexdigest()[:ID_HEX_DIGITS]


def parse_record(record, fields: QuestionFields = DEFAULT_FIELDS, *, require_answers: bool = False) -> Question:
    """One decoded record -> Question; raises BadQuestion with the reason."""
    if not isinstance(record, dict):
        raise BadQuestion(f"not a JSON object but a {type(record).__name__}")
    question = record.get(fields.question)
    if not isinstance(question, str):
        hint = f"pass {fields.question_option}" if fields.question_option else f"fields: {_names(record)}"
        raise BadQuestion(f"no string field {fields.question!r}", hint)
    if not question.strip():
        raise BadQuestion(f"field {fields.question!r} is empty")
    qid = record.get(fields.id)
    if qid is None:
        qid = missing_id(question)
    elif isinstance(qid, bool) or not isinstance(qid, (str, int)):
        raise BadQuestion(f"field {fields.id!r} is a {type(qid).__name__}, not a string or integer",
                          f"pass {fields.id_option}" if fields.id_option else "")
    answers = record.get("answers", record.get("answer"))
    answers = [answers] if isinstance(answers, str) else answers
    good = isinstance(answers, list) and answers and all(isinstance(a, str) and a for a in answers)
    if require_answers and not good:
        raise BadQuestion("no 'answers' or 'answer'", "a list of non-empty strings, or one string")
    return Question(str(qid), question, list(answers) if good else [])


def parse_line(line: str, fields: QuestionFields = DEFAULT_FIELDS, *, require_answers: bool = False) -> Question:
    """One JSONL line -> Question; raises BadQuestion with the reason."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise BadQuestion("not valid JSON", f"{e.msg} at column {e.colno}") from None
    return parse_record(record, fields, require_answers=require_answers)


def starts_like_array(head: bytes | str) -> bool:
    """Whether the first non-space character (after a UTF-8 byte order mark) is ``[``."""
    if isinstance(head, bytes):
        head = head.decode("utf-8", "replace")
    return head.lstrip("\ufeff \t\r\n").startswith("[")


def parse_questions(data: bytes, fields: QuestionFields = DEFAULT_FIELDS, *, require_answers: bool = False
                    ) -> Iterator[tuple[int, str, Question | BadQuestion]]:
    """A whole question file (either form) -> (position, excerpt, Question or BadQuestion) per record.

    Position is the 1-based line number (JSONL) or index in the array (JSON); excerpt is the record's text.
    """
    records = _json_array(data) if starts_like_array(data[:4096]) else None
    if records is not None:
        for position, record in enumerate(records, 1):
            excerpt = json.dumps(record, ensure_ascii=False)
            try:
                yield position, excerpt, parse_record(record, fields, require_answers=require_answers)
            except BadQuestion as e:
                yield position, excerpt, e
        return
    for number, raw in enumerate(data.removeprefix(b"\xef\xbb\xbf").splitlines(), 1):
        if not raw.strip():
            continue
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            yield number, raw.decode("utf-8", "replace"), BadQuestion("not valid UTF-8", f"byte {e.start}")
            continue
        try:
            yield number, line, parse_line(line, fields, require_answers=require_answers)
        except BadQuestion as e:
            yield number, line, e


def read_question_file(path, fields: QuestionFields = DEFAULT_FIELDS, *, require_answers: bool = False
                       ) -> tuple[list[Question], list[dict]]:
    """A question file (local or gs://) -> (questions, rejects); the first question of each id is kept.

    Each reject is ``{"line": position, "reason": ..., "record": excerpt}`` (+ ``"detail"`` when there is one).
    """
    data = read_file(path)
    if data is None:
        raise FileNotFoundError(f"question file {path} does not exist")
    questions, rejects, seen = [], [], set()
    for position, excerpt, parsed in parse_questions(data, fields, require_answers=require_answers):
        if isinstance(parsed, Question) and parsed.id in seen:
            parsed = BadQuestion(f"duplicate id {parsed.id!r}")
        if isinstance(parsed, BadQuestion):
            reject = {"line": position, "reason": parsed.reason, "record": excerpt.strip()[:200]}
            if parsed.detail:
                reject["detail"] = parsed.detail
            rejects.append(reject)
            continue
        seen.add(parsed.id)
        questions.append(parsed)
    return questions, rejects


def _json_array(data: bytes) -> list | None:
    """The file as one JSON array, or None when it is not one JSON value (then it is JSONL)."""
    try:
        value = json.loads(data.decode("utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return value if isinstance(value, list) else None


def _names(record: dict) -> str:
    names = sorted(map(str, record))
    return ", ".join(repr(n) for n in names[:8]) + (", ..." if len(names) > 8 else "") if names else "none"
