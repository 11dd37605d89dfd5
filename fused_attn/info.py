"""`python -m fused_attn.info`: versions, and which backends can run here (and why not)."""
import torch

from . import __version__, backends


def main() -> None:
    print(f"fused_attn {__version__}, torch {torch.__version__}")
    try:
        import triton
        print(f"triton {triton.__version__}")
    except Exception as e:  # noqa: BLE001 - report, never fail
        print(f"triton: not importable ({e})")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for dev in devices:
        probe = torch.empty(1, 1, 1, 64, device=dev)
        for name in backends.names():
            why = backends.reasons(name, probe)
            print(f"  {dev:4s} {name:9s} {'available' if not why else 'unavailable: ' + '; '.join(why)}")


if __name__ == "__main__":
    main()
