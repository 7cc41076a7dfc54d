"""What a finished run shows: run statistics read from the run directory, the HTML report, dataset and model
cards, publication to the Hub.

Reads run directories only (never a live run). Top layer: may import every other layer, including the metric
keys stages declare.
"""
