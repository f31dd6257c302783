"""`cores demo`: a local web page to try a model (Gradio, the optional ``demo`` extra)."""

from __future__ import annotations

from pathlib import Path

import typer

from .common import clean_errors, err_console, use_threads


@clean_errors
def demo(
    checkpoint: Path = typer.Option(None, "--checkpoint", "-c", help="A cores checkpoint directory, run directory or Hub id; default: the tiny model shipped with cores (synthetic scenes only)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to serve on; 127.0.0.1 keeps the page on this machine (0.0.0.0 exposes it to the network)."),
    port: int = typer.Option(7860, "--port", min=1, max=65535, help="Port to serve on."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N."),
    dtype: str = typer.Option("auto", "--dtype", help="auto (bf16 on CUDA, fp32 on the CPU), fp32, bf16 or fp16."),
    threads: int = typer.Option(None, "--threads", min=1, help="CPU threads for torch. Default: this process's share of the CPUs that are idle now (OMP_NUM_THREADS, when set, is kept)."),
    workdir: Path = typer.Option(None, "--workdir", help="A folder in which the demo makes its own folder for each request's mask PNG and JSON record (default: the system's temporary folder); only that folder is served."),
    quantize: str = typer.Option(None, "--quantize", help="8bit or 4bit: load the LLaVA through bitsandbytes (CUDA; pip install 'cores\\[quantize]')."),
    device_map: str = typer.Option(None, "--device-map", help="auto: spread the LLaVA over the visible GPUs (a 13B model on two smaller GPUs)."),
) -> None:
    """Serve a web page to try a model: upload an image (or pick an example), ask a question,
    choose teacher or generate mode, and see the overlay with every chain level, the answer,
    and the mask PNG and JSON record to download. The model loads once; requests queue.

    Needs the demo extra: pip install "cores\\[demo]".

    Example: cores demo -c models/lisa-7b --port 7860
    """
    import tempfile

    from ..api import load
    from ..bundled import EXAMPLE_QUERY, example_image
    from ..demo.app import build_app, launch, require_gradio
    from ..demo.session import DemoSession

    require_gradio()  # before the model loads: the missing extra is the first thing to say
    use_threads(threads)
    segmenter = load(str(checkpoint) if checkpoint else None, device=device, dtype=dtype, quantize=quantize, device_map=device_map)
    session = DemoSession(segmenter, workdir or Path(tempfile.gettempdir()))
    app = build_app(session, [(example_image(), EXAMPLE_QUERY)])
    err_console.print(f"cores demo: http://{host}:{port} (model {segmenter.source}; files in {session.files}); Ctrl+C stops it", markup=False, soft_wrap=True)
    launch(app, session, host, port)
