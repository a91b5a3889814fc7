package standin

import groovy.json.JsonOutput
import groovy.json.JsonSlurper
import qupath.lib.objects.PathObject

/**
 * Test support, not Gson: what {@code GsonTools.getInstance()} returns in the stand-in world.
 * It offers the two com.google.gson.Gson methods the scripts call, with Gson's behaviour:
 * {@code toJson(Object)} serialises PathObjects as GeoJSON Features (through QuPath's type
 * adapter; a collection gives a JSON array), maps and lists recursively; {@code fromJson(text,
 * Class)} parses JSON into LinkedHashMap / ArrayList / Double / String / Boolean (all numbers
 * become Double, as with Gson's Object adapter). A Groovy GString is refused: real Gson would
 * write it as an object of its fields, so scripts must pass java.lang.String.
 */
class StandInGson {
    private final boolean pretty

    StandInGson(boolean pretty) { this.pretty = pretty }

    String toJson(Object src) {
        String text = JsonOutput.toJson(toJsonValue(src))
        return pretty ? JsonOutput.prettyPrint(text) : text
    }

    Object fromJson(String json, Class cls) {
        Object parsed = json == null || json.trim().isEmpty() ? null : GeoJson.normalise(new JsonSlurper().parseText(json))
        if (parsed == null)
            return null
        if (PathObject.isAssignableFrom(cls))
            return GeoJson.fromFeature((Map) parsed)
        if (Map.isAssignableFrom(cls) && !(parsed instanceof Map))
            throw new IllegalStateException('Expected BEGIN_OBJECT but was ' + parsed.getClass().getSimpleName())
        if (List.isAssignableFrom(cls) && !(parsed instanceof List))
            throw new IllegalStateException('Expected BEGIN_ARRAY but was ' + parsed.getClass().getSimpleName())
        if (cls == String && !(parsed instanceof String))
            throw new IllegalStateException('Expected a string')
        return parsed
    }

    Object fromJson(Reader reader, Class cls) { return fromJson(reader.text, cls) }

    private static Object toJsonValue(Object o) {
        if (o == null || o instanceof String || o instanceof Boolean)
            return o
        if (o instanceof GString)
            throw new IllegalArgumentException('real Gson would serialise a GString as an object, not text: ' +
                    'pass a java.lang.String (call toString())')
        if (o instanceof Number) {
            double d = ((Number) o).doubleValue()
            if (Double.isNaN(d) || Double.isInfinite(d))
                throw new IllegalArgumentException('non-finite number in JSON')
            return o
        }
        if (o instanceof PathObject)
            return GeoJson.toFeature((PathObject) o)
        if (o instanceof Map) {
            Map out = new LinkedHashMap()
            ((Map) o).each { k, v -> out.put(k.toString(), toJsonValue(v)) }
            return out
        }
        if (o instanceof Collection)
            return ((Collection) o).collect { toJsonValue(it) }
        if (o instanceof Object[])
            return ((Object[]) o).collect { toJsonValue(it) }
        if (o instanceof UUID)
            return o.toString()
        throw new IllegalArgumentException('stand-in Gson cannot serialise ' + o.getClass().getName())
    }
}
