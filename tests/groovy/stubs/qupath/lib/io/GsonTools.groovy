package qupath.lib.io

import standin.StandInGson

/**
 * STAND-IN for QuPath's GsonTools (not QuPath). The real getInstance() returns a
 * com.google.gson.Gson with QuPath's type adapters; this returns {@link StandInGson}, which has
 * the Gson methods the scripts call (toJson(Object), fromJson(String, Class)) with Gson's
 * behaviour, because Gson itself is not available where the tests run.
 */
class GsonTools {
    static StandInGson getInstance() { return new StandInGson(false) }

    static StandInGson getInstance(boolean pretty) { return new StandInGson(pretty) }
}
