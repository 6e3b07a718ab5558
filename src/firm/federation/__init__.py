"""The Flower glue: the two apps, the strategy, their protocol and the simulation start-up."""
