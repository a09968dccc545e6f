"""Push a video file to an RTSP server in real time, like a camera would (a test helper).

Run as ``python -m tests.rtsp_pusher VIDEO URL [--loop] [--transport udp|tcp]``.

The H.264 packets are copied as they are (no re-encoding: the clip has no B-frames, so the
packets relay over RTP unchanged and the pusher costs almost no CPU); the audio is dropped
because the readers under test only want pictures. Packets are sent at the pace of their
timestamps, so pullers see a live stream rather than a 10-second burst. With ``--loop`` the
file restarts at its end and timestamps keep increasing, so the stream never ends until the
process is killed (SIGTERM/SIGINT end it cleanly).

rtsp-server-perl takes the pushed RTP over UDP only (RTP interleaved in the TCP control
connection is parsed as garbage requests), hence ``--transport udp`` by default.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from fractions import Fraction
from pathlib import Path
from types import FrameType

import av
from av.container import InputContainer, OutputContainer
from av.video.stream import VideoStream

_stopping = False


def _stop(_signum: int, _frame: FrameType | None) -> None:
    global _stopping
    _stopping = True


class _Pacer:
    """Maps stream time (the pushed pts, starting at 0) onto the monotonic clock.

    FFmpeg's RTSP muxer stamps its RTCP sender reports as if pts 0 was sent when the session
    was announced. Starting the clock just before the header (ANNOUNCE/SETUP/RECORD) is
    written keeps the packets' send times in step with those NTP stamps, so a puller that
    trusts RTCP gets capture times that agree with its own wall clock.
    """

    def __init__(self) -> None:
        self.start = time.monotonic()

    def wait(self, stream_time: float) -> None:
        delay = self.start + stream_time - time.monotonic()
        if delay > 0:
            time.sleep(delay)


def _push_once(
    source: InputContainer,
    output: OutputContainer,
    out_stream: VideoStream,
    pts_offset: int,
    pacer: _Pacer,
) -> int:
    """Send every video packet of ``source`` once; return the offset for the next pass.

    ``pts_offset`` is added to the file's timestamps so that the pushed stream starts at 0
    and keeps increasing over loops (the clip's first pts is not 0: an edit list delays it).
    """
    in_stream = source.streams.video[0]
    in_base = in_stream.time_base or Fraction(1, 90000)
    frame_ticks = 1
    if in_stream.average_rate:
        frame_ticks = max(1, round(1 / (in_stream.average_rate * in_base)))
    first_pts: int | None = None
    end_pts = pts_offset
    for packet in source.demux(in_stream):
        if _stopping:
            break
        if packet.pts is None or packet.size == 0:
            continue
        if first_pts is None:
            first_pts = packet.pts
        pts = packet.pts - first_pts + pts_offset
        dts = (packet.dts if packet.dts is not None else packet.pts) - first_pts + pts_offset
        pacer.wait(float(pts * in_base))
        packet.pts = pts
        packet.dts = dts
        packet.time_base = in_base
        packet.stream = out_stream
        # (``mux`` rescales the packet in place, so its duration is read before.)
        duration = max(frame_ticks, packet.duration or 0)
        output.mux(packet)
        end_pts = max(end_pts, pts + duration)
    return end_pts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("video", type=Path)
    parser.add_argument("url")
    parser.add_argument("--loop", action="store_true", help="restart the file at its end")
    parser.add_argument("--transport", choices=("udp", "tcp"), default="udp")
    args = parser.parse_args(argv)

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)

    source = av.open(str(args.video))
    output = av.open(
        args.url,
        "w",
        format="rtsp",
        options={"rtsp_transport": args.transport},
        timeout=10.0,
    )
    template = source.streams.video[0]
    out_stream = output.add_stream_from_template(template)
    out_stream.time_base = template.time_base
    pacer = _Pacer()
    output.start_encoding()
    pts_offset = 0
    try:
        while not _stopping:
            pts_offset = _push_once(source, output, out_stream, pts_offset, pacer)
            if not args.loop or _stopping:
                break
            # Seeking back is cheap; reopening the file would delay the next keyframe and
            # the catch-up burst that follows could overflow the relay's UDP buffers.
            source.seek(0)
    finally:
        source.close()
        output.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
