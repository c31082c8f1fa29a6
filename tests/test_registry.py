import json

from coordinator.registry import Registry, Requirements


def registry_with(**nodes):
    registry = Registry()
    for name, caps in nodes.items():
        registry.update(name, {"state": "online", "recipe": "paper", "capabilities": caps})
    return registry


def test_selection_is_seeded_and_respects_fraction_and_minimum():
    registry = registry_with(**{f"n{i}": {} for i in range(10)})
    a = registry.select(fraction=0.3, minimum=1, seed=7)
    assert a == registry.select(fraction=0.3, minimum=1, seed=7) and len(a) == 3
    assert len(registry.select(fraction=0.1, minimum=4, seed=7)) == 4


def test_offline_nodes_and_other_recipes_are_not_selected():
    registry = registry_with(a={}, b={})
    registry.update("b", {"state": "offline"})  # its Last Will
    registry.update("c", {"state": "online", "recipe": "text-full"})
    assert registry.online("paper") == ["a"]


def test_capability_filters():
    registry = registry_with(
        jetson={"gpu_memory_free_mb": 6000, "supports_4bit": True},
        small={"gpu_memory_free_mb": 900, "supports_4bit": True},
        cpu_box={"memory_free_mb": 20000, "supports_4bit": False},
        unknown={},
    )
    assert registry.online(requirements=Requirements(min_memory_mb=2000)) == ["cpu_box", "jetson"]
    assert registry.online(requirements=Requirements(needs_4bit=True)) == ["jetson", "small"]
    assert registry.select(fraction=1.0, minimum=1, seed=0, requirements=Requirements(2000, True)) == ["jetson"]


def test_the_registry_snapshot_is_strict_json_whatever_was_received():
    registry = registry_with(a={"dataset_size": 1})
    registry.update("b", json.loads('{"state": "online", "capabilities": {"memory_free_mb": NaN}, "recipe": 5}'))
    registry.update("c", json.loads('{"state": "online", "capabilities": {"memory_free_mb": Infinity}}'))
    registry.nodes["a"].capabilities["raw"] = float("nan")  # even a value put there without the schema
    text = json.dumps(registry.snapshot(), allow_nan=False)
    assert json.loads(text)["c"]["capabilities"] == {}
    assert "b" not in registry.nodes  # its status named recipe 5: dropped, nothing kept (not even a slot)
