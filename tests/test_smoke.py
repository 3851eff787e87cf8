from federation.client import HubClient
from federation.envelope import Addition

BRIDGE = "f8f8f0cce0f4e84d0e370a22028f67f0b36e2ed596623e1d33e6339c4e9c9b22"


async def test_submit_then_lookup(clients: dict[str, HubClient]) -> None:
    acme = clients["acme"]
    result = await acme.submit("main", [Addition("pdq", BRIDGE, ("csam",))])
    assert result.created
    matches = await clients["reader"].lookup([("pdq", BRIDGE)])
    assert [m["submitters"] for m in matches[0]] == [["acme"]]
