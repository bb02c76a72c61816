"""Token ids -> text, one token at a time, in constant work per token.

Decoding a lone token loses the leading space of SentencePiece-style vocabularies and splits multi-byte
characters; decoding everything so far on each token is quadratic. So decode a window from the previous
emitted chunk to the new token and emit only what it adds to that chunk (the approach of vLLM's
incremental detokenizer).
"""


class IncrementalDetokenizer:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.token_ids: list[int] = []
        self.text = ""
        self._prefix_offset = 0  # window start
        self._read_offset = 0  # tokens before this are already in `text`

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token_id: int) -> str:
        self.token_ids.append(token_id)
        prefix_text = self._decode(self.token_ids[self._prefix_offset : self._read_offset])
        full_text = self._decode(self.token_ids[self._prefix_offset :])
        # An incomplete UTF-8 sequence decodes to U+FFFD: wait for the next token to finish it.
        if len(full_text) <= len(prefix_text) or full_text.endswith("\ufffd"):
            return ""
        new_text = full_text[len(prefix_text) :]
        self.text += new_text
        self._prefix_offset = self._read_offset
        self._read_offset = len(self.token_ids)
        return new_text

    def flush(self) -> str:
        """Whatever is still held back once generation ended (e.g. a dangling partial character)."""
        if self._read_offset >= len(self.token_ids):
            return ""
        prefix_text = self._decode(self.token_ids[self._prefix_offset : self._read_offset])
        full_text = self._decode(self.token_ids[self._prefix_offset :])
        new_text = full_text[len(prefix_text) :]
        self.text += new_text
        self._read_offset = len(self.token_ids)
        return new_text
