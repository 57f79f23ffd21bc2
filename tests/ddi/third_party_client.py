#!/usr/bin/env python3
"""A third-party DDI client against the bridge: pengutronix's rauc-hawkbit (PyPI 0.2.0, the
asyncio client behind its RAUC updater), used as it is, with a TargetToken.

Polls the root, follows the deploymentBase link, downloads the artifact with the client's own
get_binary (which returns the md5 it computed), checks it against the deployment's hashes and
reports proceeding, then closed/success. Exits 0 when all of that worked.

usage: third_party_client.py HOST:PORT CONTROLLER_ID TARGET_TOKEN DOWNLOAD_DIR
(SSL_CERT_FILE points Python's default context at the bridge's CA.)
"""
import asyncio
import os
import sys

import aiohttp
from rauc_hawkbit.ddi.client import DDIClient
from rauc_hawkbit.ddi.deployment_base import DeploymentStatusExecution, DeploymentStatusResult


async def main(host, controller, token, dl_dir):
    async with aiohttp.ClientSession() as session:
        ddi = DDIClient(session, host, True, token, "DEFAULT", controller)
        base = await ddi()
        href = base["_links"]["deploymentBase"]["href"]
        action_id = href.split("/deploymentBase/")[1].split("?")[0]
        c = href.split("?c=")[1] if "?c=" in href else None
        deployment = await ddi.deploymentBase[action_id](c)
        chunk = deployment["deployment"]["chunks"][0]
        artifact = chunk["artifacts"][0]
        url = artifact["_links"]["download"]["href"]
        path = os.path.join(dl_dir, artifact["filename"])
        md5 = await ddi.get_binary(url, path)
        if md5 != artifact["hashes"]["md5"]:
            print(f"md5 mismatch: {md5} != {artifact['hashes']['md5']}")
            return 1
        if os.path.getsize(path) != artifact["size"]:
            print("size mismatch")
            return 1
        action = ddi.deploymentBase[action_id]
        await action.feedback(DeploymentStatusExecution.proceeding, DeploymentStatusResult.none,
                              ["downloaded by rauc-hawkbit"])
        await action.feedback(DeploymentStatusExecution.closed, DeploymentStatusResult.success,
                              ["installed by rauc-hawkbit"])
        print(f"action {action_id} done: {chunk['name']} {chunk['version']} md5 {md5}")
        return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(*sys.argv[1:5])))
