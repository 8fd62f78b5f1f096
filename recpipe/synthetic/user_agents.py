"""The user agents: real-looking templates, the version numbers and models that fill them, and each ranking's agent."""

import numpy as np

_UA_TEMPLATES = [  # (weight, template)
    (18, "Mozilla/5.0 (iPhone; CPU iPhone OS {ios} like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) "
         "Version/{ios_short} Mobile/15E148 Safari/604.1"),
    (3, "Mozilla/5.0 (iPhone; CPU iPhone OS {ios} like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) "
        "CriOS/{chrome} Mobile/15E148 Safari/604.1"),
    (1, "Mozilla/5.0 (iPhone; CPU iPhone OS {ios} like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) "
        "GSA/{gsa} Mobile/15E148 Safari/604.1"),
    (1, "Mozilla/5.0 (iPhone; CPU iPhone OS {ios} like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) "
        "Mobile/15E148 Instagram {meta} (iPhone14,5; iOS {ios}; en_US; en; scale=3.00; 1170x2532; 532277346)"),
    (1, "Mozilla/5.0 (iPhone; CPU iPhone OS {ios} like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) "
        "Mobile/15E148 [FBAN/FBIOS;FBAV/{meta};FBBV/572336521;FBDV/iPhone15,2;FBMD/iPhone;FBSN/iOS;"
        "FBSV/{ios_dot};FBSS/3;FBCR/;FBID/phone;FBLC/en_US;FBOP/80]"),
    (3, "Mozilla/5.0 (iPad; CPU OS {ios} like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) "
        "Version/{ios_short} Mobile/15E148 Safari/604.1"),
    (0.5, "Mozilla/5.0 (iPad; CPU OS {ios} like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) "
          "CriOS/{chrome} Mobile/15E148 Safari/604.1"),
    (8, "Mozilla/5.0 (Linux; Android {android}; {samsung}) AppleWebKit/537.36 (KHTML, like Gecko) "
        "Chrome/{chrome} Mobile Safari/537.36"),
    (3, "Mozilla/5.0 (Linux; Android {android}; {samsung}) AppleWebKit/537.36 (KHTML, like Gecko) "
        "SamsungBrowser/{samsung_browser} Chrome/{chrome_major}.0.0.0 Mobile Safari/537.36"),
    (4, "Mozilla/5.0 (Linux; Android {android}; {pixel}) AppleWebKit/537.36 (KHTML, like Gecko) "
        "Chrome/{chrome} Mobile Safari/537.36"),
    (3, "Mozilla/5.0 (Linux; Android {android}; {xiaomi}) AppleWebKit/537.36 (KHTML, like Gecko) "
        "Chrome/{chrome} Mobile Safari/537.36"),
    (1, "Mozilla/5.0 (Linux; U; Android {android}; en-us; {xiaomi} Build/{build}) AppleWebKit/537.36 "
        "(KHTML, like Gecko) Version/4.0 Chrome/{chrome_major}.0.0.0 Mobile Safari/537.36 "
        "XiaoMi/MiuiBrowser/{miui}"),
    (4, "Mozilla/5.0 (Linux; Android 10; K) AppleWebKit/537.36 (KHTML, like Gecko) "
        "Chrome/{chrome_major}.0.0.0 Mobile Safari/537.36"),
    (2, "Mozilla/5.0 (Linux; Android {android}; {pixel} Build/{build}; wv) AppleWebKit/537.36 "
        "(KHTML, like Gecko) Version/4.0 Chrome/{chrome} Mobile Safari/537.36"),
    (0.5, "Mozilla/5.0 (Android {android}; Mobile; rv:{firefox}) Gecko/{firefox} Firefox/{firefox}"),
    (1, "Mozilla/5.0 (Linux; Android {android}; {oneplus}) AppleWebKit/537.36 (KHTML, like Gecko) "
        "Chrome/{chrome} Mobile Safari/537.36"),
    (1, "Mozilla/5.0 (Linux; Android {android}; {huawei}) AppleWebKit/537.36 (KHTML, like Gecko) "
        "Chrome/{chrome} Mobile Safari/537.36"),
    (1, "Mozilla/5.0 (Linux; Android {android}; {moto}) AppleWebKit/537.36 (KHTML, like Gecko) "
        "Chrome/{chrome} Mobile Safari/537.36"),
    (1, "Mozilla/5.0 (Linux; Android {android}; {samsung_tab}) AppleWebKit/537.36 (KHTML, like Gecko) "
        "Chrome/{chrome} Safari/537.36"),
    (12, "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
         "Chrome/{chrome} Safari/537.36"),
    (5, "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
        "Chrome/{chrome_major}.0.0.0 Safari/537.36 Edg/{edge}"),
    (3, "Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:{firefox}) Gecko/20100101 Firefox/{firefox}"),
    (0.5, "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
          "Chrome/{chrome_major}.0.0.0 Safari/537.36 OPR/{opera}"),
    (5, "Mozilla/5.0 (Macintosh; Intel Mac OS X {macos}) AppleWebKit/605.1.15 (KHTML, like Gecko) "
        "Version/{ios_short} Safari/605.1.15"),
    (5, "Mozilla/5.0 (Macintosh; Intel Mac OS X {macos}) AppleWebKit/537.36 (KHTML, like Gecko) "
        "Chrome/{chrome} Safari/537.36"),
    (1, "Mozilla/5.0 (Macintosh; Intel Mac OS X {macos_dot}; rv:{firefox}) Gecko/20100101 Firefox/{firefox}"),
    (0.5, "Mozilla/5.0 (Macintosh; Intel Mac OS X {macos}) AppleWebKit/537.36 (KHTML, like Gecko) "
          "Chrome/{chrome_major}.0.0.0 Safari/537.36 Edg/{edge}"),
    (1, "Mozilla/5.0 (X11; Linux x86_64; rv:{firefox}) Gecko/20100101 Firefox/{firefox}"),
    (1, "Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:{firefox}) Gecko/20100101 Firefox/{firefox}"),
    (1, "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/{chrome} Safari/537.36"),
    (0.5, "Mozilla/5.0 (X11; CrOS x86_64 {cros}) AppleWebKit/537.36 (KHTML, like Gecko) "
          "Chrome/{chrome} Safari/537.36"),
    (3, "ShopApp/{app} (iPhone; iOS {ios_dot}; Scale/3.00)"),
    (3, "ShopApp/{app} (Linux; Android {android}; {samsung}) okhttp/4.12.0"),
    (0.3, "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)"),
    (0.3, "Mozilla/5.0 (Linux; Android 6.0.1; Nexus 5X Build/MMB29P) AppleWebKit/537.36 (KHTML, like Gecko) "
          "Chrome/{chrome} Mobile Safari/537.36 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)"),
    (0.3, "Mozilla/5.0 AppleWebKit/537.36 (KHTML, like Gecko; compatible; bingbot/2.0; "
          "+http://www.bing.com/bingbot.htm) Chrome/{chrome_major}.0.0.0 Safari/537.36"),
    (0.1, "Mozilla/5.0 (compatible; YandexBot/3.0; +http://yandex.com/bots)"),
    (0.1, "facebookexternalhit/1.1 (+http://www.facebook.com/externalhit_uatext.php)"),
    (0.1, "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_5) AppleWebKit/605.1.15 (KHTML, like Gecko) "
          "Version/13.1.1 Safari/605.1.15 (Applebot/0.1; +http://www.apple.com/go/applebot)"),
    (0.1, "python-requests/2.{minor}.0"),
    (0.2, "Mozilla/5.0 (Linux; Android 9; KFTRWI) AppleWebKit/537.36 (KHTML, like Gecko) "
          "Silk/{silk} like Chrome/{chrome} Safari/537.36"),
    (0.1, "Mozilla/5.0 (SMART-TV; LINUX; Tizen {tizen}) AppleWebKit/537.36 (KHTML, like Gecko) "
          "{chrome_major}.0.0.0/{tizen} TV Safari/537.36"),
]
_SAMSUNG = ["SM-S918B", "SM-S911B", "SM-G991B", "SM-G998B", "SM-A536B", "SM-A546B", "SM-A145R", "SM-N986B",
            "SM-S928B", "SM-A256B", "SM-G781B", "SM-F946B"]
_PIXEL = ["Pixel 6", "Pixel 6a", "Pixel 7", "Pixel 7 Pro", "Pixel 8", "Pixel 8 Pro", "Pixel 9", "Pixel 7a"]
_XIAOMI = ["Redmi Note 12", "Redmi Note 11", "2201117TG", "M2101K6G", "23049PCD8G", "Mi 11", "22111317G", "POCO F5"]
_ONEPLUS = ["CPH2449", "CPH2581", "LE2123", "NE2213", "CPH2411"]
_HUAWEI = ["ELS-NX9", "VOG-L29", "ANA-NX9", "JNY-LX1", "MAR-LX1A"]
_MOTO = ["moto g(60)", "moto g(30)", "motorola edge 30", "moto g54 5G", "moto e(7)"]
_SAMSUNG_TAB = ["SM-X200", "SM-T220", "SM-X710", "SM-T505"]
_MACOS = ["10_15_7", "13_6", "14_2_1", "14_4", "12_7_1"]


def _ua_values(rng):
    """One set of version numbers and models for the templates."""
    def draw(options):
        return options[int(rng.integers(len(options)))]

    ios_major, ios_minor, ios_patch = int(rng.integers(15, 19)), int(rng.integers(0, 8)), int(rng.integers(0, 4))
    chrome_major = int(rng.integers(110, 132))
    firefox = f"{int(rng.integers(115, 134))}.0"
    android = str(int(rng.integers(10, 16)))
    macos = draw(_MACOS)
    return {
        "ios": f"{ios_major}_{ios_minor}" + (f"_{ios_patch}" if ios_patch else ""),
        "ios_dot": f"{ios_major}.{ios_minor}" + (f".{ios_patch}" if ios_patch else ""),
        "ios_short": f"{ios_major}.{ios_minor}",
        "chrome": f"{chrome_major}.0.{int(rng.integers(5000, 6800))}.{int(rng.integers(0, 250))}",
        "chrome_major": chrome_major,
        "edge": f"{chrome_major}.0.{int(rng.integers(1500, 2600))}.{int(rng.integers(0, 120))}",
        "firefox": firefox, "android": android, "macos": macos, "macos_dot": macos.replace("_", "."),
        "samsung": draw(_SAMSUNG), "pixel": draw(_PIXEL), "xiaomi": draw(_XIAOMI), "oneplus": draw(_ONEPLUS),
        "huawei": draw(_HUAWEI), "moto": draw(_MOTO), "samsung_tab": draw(_SAMSUNG_TAB),
        "samsung_browser": f"{int(rng.integers(20, 26))}.0",
        "gsa": f"{int(rng.integers(300, 330))}.0.{int(rng.integers(6 * 10**8, 7 * 10**8 - 1))}",
        "meta": f"{int(rng.integers(300, 460))}.0.0.{int(rng.integers(10, 60))}.{int(rng.integers(10, 120))}",
        "miui": f"14.{int(rng.integers(1, 12))}.{int(rng.integers(1, 40))}-gn",
        "build": draw(["TQ3A.230805.001", "UP1A.231005.007", "AP1A.240305.019", "SKQ1.211019.001", "TKQ1.221114.001"]),
        "opera": f"{int(rng.integers(100, 112))}.0.0.0",
        "cros": f"{int(rng.integers(15000, 15900))}.{int(rng.integers(0, 90))}.0",
        "app": f"5.{int(rng.integers(0, 14))}.{int(rng.integers(0, 5))}",
        "minor": int(rng.integers(25, 33)), "silk": f"{int(rng.integers(100, 130))}.{int(rng.integers(1, 6))}.1",
        "tizen": draw(["5.5", "6.0", "6.5", "7.0"]),
    }


class _Pool:
    """A few thousand distinct agents, about `target` in all, each template's share in its weight; shared by all
    blocks of customers."""

    def __init__(self, rng, target=3000):
        weights = np.array([weight for weight, _ in _UA_TEMPLATES])
        self.template_cdf = np.cumsum(weights / weights.sum())
        agents, starts, counts = [], [], []
        for weight, template in _UA_TEMPLATES:
            variants = dict.fromkeys(template.format(**_ua_values(rng))
                                     for _ in range(max(3, round(target * weight / weights.sum()))))
            starts.append(len(agents))
            counts.append(len(variants))
            agents.extend(variants)
        self.agents, self.starts, self.counts = agents, np.array(starts), np.array(counts)

    def sample(self, rng, size):
        """Indices into `agents`, a template drawn by weight, then one of its variants."""
        template = np.minimum(np.searchsorted(self.template_cdf, rng.random(size), side="right"), len(self.starts) - 1)
        return self.starts[template] + (rng.random(size) * self.counts[template]).astype(np.int64)


def _user_agents(rng, pool, block, rankings):
    """The user agent of every ranking of a block: (table of strings, with None for null; code per ranking into it)."""
    # Table: null, empty, blank, the pool, the pool with stray whitespace, then the garbage.
    special = 3
    primary = special + pool.sample(rng, block.customers)
    n = len(rankings["customer_id"])
    code = primary[rankings["customer_id"] - block.first]
    draw = rng.random(n)
    other = draw < 0.06  # a second device
    code[other] = special + pool.sample(rng, int(other.sum()))
    padded = (draw >= 0.06) & (draw < 0.065)
    code[padded] += len(pool.agents)
    code[(draw >= 0.065) & (draw < 0.085)] = 0
    code[(draw >= 0.085) & (draw < 0.095)] = 1
    code[(draw >= 0.095) & (draw < 0.097)] = 2
    garbage = np.flatnonzero(draw >= 0.9995)
    table = [None, "", "   ", *pool.agents, *(f" {agent}  " for agent in pool.agents)]
    for row in garbage:
        code[row] = len(table)
        if rng.random() < 0.5:
            table.append(rng.bytes(int(rng.integers(16, 256))).decode("latin-1"))
        else:
            table.append("Mozilla/5.0 (" + "Windows NT 10.0; " * int(rng.integers(590, 700)) + ")")
    return table, code
