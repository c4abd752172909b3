"""The decode graphs' per-step inputs, double-buffered so that one step is filled and copied in while the step
before still runs, and the streams and events that order those copies against the replays."""

from __future__ import annotations

from typing import NamedTuple

import torch

# input ids first: a chained copy skips them; prev_rows: which rows of the step in flight a step launched ahead
# on some of them keeps (KeptRows)
FIELDS = ("input_ids", "positions", "slot_mapping", "seq_lens", "prev_rows")


class KeptRows(NamedTuple):
    """The device tokens of the rows `keep` (increasing indices) of the step in flight, gathered on the device
    when the step launched on them uploads its inputs (no index tensor is made for it)."""
    tokens: torch.Tensor
    keep: list[int]


class StepBuffers:
    """Two input buffers used in turn by the decode steps (`turn` is the last step's buffer).

    Layout: buffer t (0 or 1) is one int64 vector on the device, `inputs[t]`, with a pinned host twin
    `hosts[t]`: the FIELDS side by side, `max_rows` entries each, then a (rows, width) block table whose rows
    are `width` apart. A step's inputs are the used prefix, brought in by one host-to-device copy.

    Invariants, for a step using buffer t:
    - it fills hosts[t] and copies it into inputs[t]; its graph reads only inputs[t];
    - its graph writes its tokens into the input ids of inputs[1 - t] (`next_input_ids`), which are the next
      step's: a step launched ahead on every row of the step in flight (chained) then finds its input ids in
      place, with no round trip through the host, and its copy skips them;
    - released[t] is recorded after the replay that reads inputs[t]. A chained step's copy runs on
      `upload_stream` and waits only for that (the graph two steps back, the buffer's last reader);
      uploaded[t] marks the copy done, and the replay waits for it;
    - fetched[t], recorded on `download_stream` after the copy to the host of the tokens a graph left in
      inputs[t], completes once they are there. Whatever overwrites those input ids waits for it: an unchained
      copy into inputs[t], and the replay that reads inputs[1 - t] (it writes its tokens into inputs[t]);
    - hosts[t] was last copied in by the step two back, whose tokens the caller has read (PendingTokens.tolist
      waits for fetched) before launching this step, so refilling it races with no copy.
    Without side streams (CPU, or replays emulated eagerly) every copy runs in order on the current stream and
    no event is kept.
    """

    def __init__(self, max_rows: int, max_width: int, device: torch.device, streams: bool):
        self.max_rows = max_rows
        size = len(FIELDS) * max_rows + max_rows * max_width
        cuda = device.type == "cuda"
        self.hosts = [torch.zeros(size, dtype=torch.int64, pin_memory=cuda) for _ in range(2)]
        self.inputs = [torch.zeros(size, dtype=torch.int64, device=device) for _ in range(2)]
        self.gathered = torch.zeros(max_rows, dtype=torch.int64, device=device)  # KeptRows' tokens, in order
        self.turn = 0
        streams = cuda and streams
        self.upload_stream = torch.cuda.Stream(device) if streams else None
        self.download_stream = torch.cuda.Stream(device) if streams else None
        self.main = None  # the stream of the last replay
        self.released, self.uploaded, self.fetched = ([torch.cuda.Event() for _ in range(2)] if streams else None
                                                      for _ in range(3))

    def next_turn(self) -> int:
        """The buffer the next step uses (the one the step before last used)."""
        self.turn ^= 1
        return self.turn

    def views(self, buf, rows: int, width: int) -> dict:
        """The fields of a (rows, width-block table) step in `buf` (a buffer, or its numpy view)."""
        n = self.max_rows
        views = {name: buf[i * n:i * n + rows] for i, name in enumerate(FIELDS)}
        start = len(FIELDS) * n
        views["block_tables"] = buf[start:start + rows * width].reshape(rows, width)
        return views

    def next_input_ids(self, t: int, rows: int) -> torch.Tensor:
        """Where the graph reading inputs[t] writes its tokens: the input ids of the other buffer."""
        return self.inputs[1 - t][:rows]

    def copy(self, t: int, rows: int, width: int, skip_ids: bool = False) -> None:
        """Copies host buffer t into its device twin, one copy of the used prefix (the fields lie side by side,
        the block table last); with `skip_ids`, all but the input ids. On the current stream."""
        start, end = self.max_rows if skip_ids else 0, len(FIELDS) * self.max_rows + rows * width
        self.inputs[t][start:end].copy_(self.hosts[t][start:end], non_blocking=True)

    def upload(self, t: int, rows: int, width: int, prev_tokens: torch.Tensor | KeptRows | None, n: int) -> None:
        """Brings the step's inputs (host buffer t, filled) into inputs[t]. With `prev_tokens` (the device
        tokens of the step in flight, one per real row) the input ids come from them: in place already when
        they are the tokens the last graph left in this buffer (chained), else copied on the device. KeptRows:
        the rows of the step in flight that the host buffer's prev_rows name, gathered on the device."""
        if isinstance(prev_tokens, KeptRows):
            self._upload_kept(t, rows, width, prev_tokens.tokens, n)
            return
        chained = prev_tokens is not None and prev_tokens.data_ptr() == self.inputs[t].data_ptr()
        main = self.main = torch.cuda.current_stream() if self.upload_stream is not None else None
        if chained and main is not None:
            # Off the critical path: the copy waits only for the graph two steps back, this buffer's last reader.
            with torch.cuda.stream(self.upload_stream):
                self.upload_stream.wait_event(self.released[t])
                self.copy(t, rows, width, skip_ids=True)
                self.uploaded[t].record()
            main.wait_event(self.uploaded[t])
        else:
            if main is not None and not chained:  # the input ids about to be overwritten hold the last tokens
                main.wait_event(self.fetched[t])
            self.copy(t, rows, width, skip_ids=chained)
            if prev_tokens is not None and not chained:  # input_ids are the first field of the device buffer
                self.inputs[t][:n].copy_(prev_tokens[:n])

    def _upload_kept(self, t: int, rows: int, width: int, tokens: torch.Tensor, n: int) -> None:
        """upload() of the first n of `tokens`' rows that prev_rows names. The tokens may be this buffer's own
        input ids (where the last graph left them): they are gathered into scratch before being overwritten."""
        main = self.main = torch.cuda.current_stream() if self.upload_stream is not None else None
        if main is not None:  # the input ids about to be overwritten hold the last tokens
            main.wait_event(self.fetched[t])
        self.copy(t, rows, width, skip_ids=True)
        index = self.views(self.inputs[t], rows, width)["prev_rows"][:n]
        gathered = self.gathered[:n]
        torch.index_select(tokens, 0, index, out=gathered)
        self.inputs[t][:n].copy_(gathered)

    def before_replay(self, t: int) -> None:
        """The replay reading inputs[t] writes its tokens over those of the step two back: wait for their copy."""
        self.main.wait_event(self.fetched[1 - t])

    def after_replay(self, t: int) -> None:
        self.released[t].record()

    def to_host(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
        """Starts copying a step's tokens into pinned host memory, on a side stream so that the next graph need
        not wait for the copy; returns the host tensor and the event to wait on before reading it."""
        cuda = tokens.is_cuda
        host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=cuda)
        if self.download_stream is None:
            host.copy_(tokens, non_blocking=cuda)
            return host, torch.cuda.current_stream().record_event() if cuda else None
        self.download_stream.wait_stream(self.main or torch.cuda.current_stream())  # the stream of the last replay
        tokens.record_stream(self.download_stream)
        with torch.cuda.stream(self.download_stream):
            host.copy_(tokens, non_blocking=True)
        event = self.fetched[1 - self.turn] = self.download_stream.record_event()  # the last graph's tokens' buffer
        return host, event
