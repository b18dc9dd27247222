"""The exact script that made ``autophasenn_2d_selun192.pt`` (7.6 min on one CPU thread, final loss 0.00196).

The 2D AutoPhaseNN for the demo's SELUN geometry as the inversion stage feeds it: 192-px frames binned 2×2
and cropped to the network's 64 px, so the network is trained with the demo's zone-plate probe seen through
that fit (``fitted_probe``) instead of the generic patch probe. Run from the repository root:

    python -m phasestream_bench.training.autophasenn_2d_selun192
"""

from phasestream_bench.training import autophasenn as trainer

from phasestream.models.nets.autophasenn.fit import fitted_probe
from phasestream.simulators.probes import make_probe
from phasestream.simulators.scan_simulation import ScanSimulationConfig


def main() -> None:
    demo = ScanSimulationConfig()
    probe = fitted_probe(
        make_probe(
            demo.probe,
            demo.detector_size_px,
            demo.probe_diameter_px,
            demo.probe_bright_field_diameter_px,
            demo.zone_plate_central_stop_fraction,
        ),
        64,
        bin_factor=2,
    )
    result = trainer.train_autophasenn(
        2,
        "models/weights/autophasenn_2d_selun192.pt",
        steps=1200,
        batch_size=16,
        lr=1e-3,
        widths=(16, 32, 64),
        seed=0,
        checkpoint_every=100,
        device="cpu",
        num_threads=1,
        probe=probe,
    )
    print(result.seconds, sum(result.losses[-20:]) / 20)


if __name__ == "__main__":
    main()
