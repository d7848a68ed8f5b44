"""Framework-free core: data, model, BI-RADS features, losses, metrics, training, privacy.

Never imports flwr: the Flower apps in client/ and server/ and the experiments in sim/ call this.
"""
