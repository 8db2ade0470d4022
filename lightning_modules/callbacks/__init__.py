"""Lightning callbacks that shape or watch a run: freezing strategies, per-group monitoring, the progress
bar, epoch seeding, the forgetting probe and the backbone export."""
