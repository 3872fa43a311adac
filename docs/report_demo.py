"""Make the README's report screenshot from a real (small) run: ``docs/report.png``.

usage: python docs/report_demo.py WORK_DIR

Trains an over-sized MLP on a small noisy regression set with safepoint (save every 20
steps, keep_last=3, keep_best=1 by eval loss, a disk budget), kills it with SIGKILL at
step 130, stops it "by a signal" after an emergency save at step 237, reruns it to the
end, then renders ``safepoint report`` and screenshots the page with headless chromium.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

STEPS = 300


def train(out: str, die_at: int | None, emergency_at: int | None) -> None:
    import torch

    from safepoint import Checkpointer

    torch.manual_seed(0)
    x, xe = torch.randn(96, 16), torch.randn(256, 16)
    w = torch.randn(16, 1)
    y, ye = x @ w + 0.8 * torch.randn(96, 1), xe @ w + 0.8 * torch.randn(256, 1)
    model = torch.nn.Sequential(
        torch.nn.Linear(16, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256), torch.nn.ReLU(),
        torch.nn.Linear(256, 1),
    )  # fmt: skip
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    state = {"model": model, "optimizer": opt}
    with Checkpointer(
        out, save_every="20", keep_last=3, keep_best=1, total_steps=STEPS, max_disk="4.2MB"
    ) as ckpt:
        start = ckpt.restore(state) or 0
        for step in range(start + 1, STEPS + 1):
            idx = torch.randint(0, 96, (16,), generator=torch.Generator().manual_seed(step))
            loss = torch.nn.functional.mse_loss(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            metrics = {"loss": loss.item()}
            if step % 20 == 0:
                with torch.no_grad():
                    metrics["eval_loss"] = torch.nn.functional.mse_loss(model(xe), ye).item()
            ckpt.step(step, state, metrics=metrics)
            if step == emergency_at:
                ckpt.save(step, state, metrics=metrics, reason="emergency (SIGTERM)")
            if step == die_at:
                os.kill(os.getpid(), signal.SIGKILL)


def main(work: str) -> int:
    run = Path(work) / "runs" / "demo"
    shutil.rmtree(run, ignore_errors=True)
    me = [sys.executable, __file__, "--train", str(run)]
    subprocess.run([*me, "130", "-"], check=False)
    subprocess.run([*me, "237", "237"], check=False)
    subprocess.run([*me, "-", "-"], check=True)
    subprocess.run([sys.executable, "-m", "safepoint", "report", "runs/demo"], check=True, cwd=work)
    docs = Path(__file__).parent
    subprocess.run(
        [
            shutil.which("chromium") or "chromium",
            *("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run"),
            *("--disable-background-networking", "--disable-component-update", "--disable-sync"),
            f"--user-data-dir={Path(work) / 'chromium-profile'}",
            *("--hide-scrollbars", "--window-size=1200,1900", "--force-device-scale-factor=1"),
            f"--screenshot={docs / 'report.png'}",
            (run / "report.html").resolve().as_uri(),
        ],
        check=True,
        capture_output=True,
    )
    print(f"wrote {docs / 'report.png'}")
    return 0


if __name__ == "__main__":
    if sys.argv[1] == "--train":
        out, die, emergency = sys.argv[2:5]
        train(out, None if die == "-" else int(die), None if emergency == "-" else int(emergency))
        sys.exit(0)
    sys.exit(main(sys.argv[1]))
