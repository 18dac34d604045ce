"""The smallest DES-LOC run: an ordinary LightningModule, 2 CPU processes, bytes saved vs DDP.

    python examples/quickstart.py                # DES-LOC, K_x=16 (states every 48 and 96 steps)
    python examples/quickstart.py --strategy ddp # the same module under plain DDP

Nothing in ``TinyRegressor`` knows about DES-LOC: it is written as for DDP. Only the Trainer's
``strategy`` changes.
"""

import argparse

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

import lightning_desloc  # registers strategy="desloc"


class TinyRegressor(L.LightningModule):
    def __init__(self, lr: float = 3e-3):
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Sequential(torch.nn.Linear(32, 128), torch.nn.GELU(), torch.nn.Linear(128, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self.net(x), y), sync_dist=True, prog_bar=True)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)

    @staticmethod
    def _data(n: int, seed: int) -> TensorDataset:
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(n, 32, generator=g)
        w = torch.linspace(-1, 1, 32)
        return TensorDataset(x, (torch.sin(x @ w) + 0.1 * torch.randn(n, generator=g)).unsqueeze(1))

    def train_dataloader(self):
        return DataLoader(self._data(16384, 0), batch_size=32, shuffle=True)

    def val_dataloader(self):
        return DataLoader(self._data(2048, 1), batch_size=256)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--strategy", default="desloc", help="'desloc' or any Lightning strategy, e.g. 'ddp'")
    parser.add_argument("--param-sync-every", type=int, default=16, help="K_x in optimizer steps")
    parser.add_argument("--max-steps", type=int, default=256)
    args = parser.parse_args()

    strategy = args.strategy
    if strategy == "desloc":
        strategy = lightning_desloc.DeslocStrategy(param_sync_every=args.param_sync_every)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=args.max_steps,
                        val_check_interval=64, logger=False, enable_checkpointing=False)
    L.seed_everything(0)
    trainer.fit(TinyRegressor())

    if trainer.is_global_zero and isinstance(trainer.strategy, lightning_desloc.DeslocStrategy):
        ledger = trainer.strategy.ledger
        print(f"\nval_loss {trainer.callback_metrics['val_loss'].item():.4f} after {args.max_steps} steps")
        print(f"{'category':<20}{'bytes':>14}{'rounds':>8}")
        for category, nbytes in sorted(ledger.bytes.items()):
            print(f"{category:<20}{nbytes:>14,}{ledger.rounds_by_category[category]:>8}")
        print(f"{'DDP would send':<20}{ledger.ddp_equivalent_bytes:>14,}")
        print(f"bytes saved vs DDP: {ledger.bytes_saved:,} ({ledger.ratio_vs_ddp:.1f}x fewer; "
              f"the initial broadcast, which DDP also does, is not compared)")
    elif trainer.is_global_zero:
        print(f"\nval_loss {trainer.callback_metrics['val_loss'].item():.4f} after {args.max_steps} steps")


if __name__ == "__main__":
    main()
