"""How a run is launched: launch lines of other frameworks (slime's flags) mapped onto recipes;
later, multi-process and multi-node placement."""
