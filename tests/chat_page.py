"""One browser page of the Chat tab, driven through its handlers without a browser (shared by the tests of the
chat tab's handlers and of ZeroGPU)."""

from __future__ import annotations

import gradio as gr

from webui import chat_tab
from webui.conversation_list import empty_record
from webui.render import unmarked

SKIP = gr.skip()
#: Chat-tab sampling inputs in slider order: system prompt, temperature, top-p, top-k, max new tokens, penalty.
GREEDY_INPUTS = ("", 0.0, 1.0, 0, 8, 1.0)


class Page:
    """One browser page of the chat tab: its outputs fed back as the next event's inputs, as gradio does."""

    def __init__(self, conv, record=None, req=None):
        self.conv, self.req = conv, req
        self.chat, self.state, self.record, self.listing = [], {}, record or empty_record(), None

    def send(self, message, inputs=GREEDY_INPUTS):
        outputs = list(chat_tab.respond(self.conv, message, self.chat, self.state, self.record, *inputs,
                                        request=self.req))
        self._take_turn(outputs)
        return outputs

    def retry(self, inputs=GREEDY_INPUTS):
        outputs = list(chat_tab.retry_last(self.conv, self.chat, self.state, self.record, *inputs,
                                           request=self.req))
        self._take_turn(outputs)
        return outputs

    def continue_(self, inputs=GREEDY_INPUTS):
        outputs = list(chat_tab.continue_last(self.conv, self.chat, self.state, self.record, *inputs,
                                              request=self.req))
        self._take_turn(outputs)
        return outputs

    def _take_turn(self, outputs):
        for chat, _box, _gauges, state, record, listing in outputs:
            self.chat, self.state = chat, state
            self.record = record if record != SKIP else self.record
            self.listing = listing if listing != SKIP else self.listing

    def show(self, outputs):
        """Take a `view` (load, new chat, switch, delete, upload)."""
        chat, gauges, state, record, listing, title, _file = outputs
        for name, value in (("chat", chat), ("state", state), ("record", record), ("listing", listing)):
            if value != SKIP:
                setattr(self, name, value)
        self.gauges, self.title = gauges, title
        return outputs

    def load(self):
        return self.show(chat_tab.load_conversation(self.conv, self.record, self.state, request=self.req))

    def texts(self, role: str) -> list[str]:
        """The text of this page's `role` messages, without the memory markers (a message that left the cache is
        shown with one before it)."""
        return [unmarked(m["content"]) for m in self.chat if m["role"] == role]

    @property
    def token(self):
        return self.state.get("token")

    def titles(self):
        return [label for label, _ in self.listing["choices"]]
